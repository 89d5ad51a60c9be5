"""Rollout engines behind one interface, hosted in Ray actors.

`generate(requests, sampling, n, seed)` returns, per request, n completions with token ids, log-probs and
text; `update_weights(named_tensors)` loads new values for some parameters in place (after a GRPO update only
the trainable ones travel: the projector is MBs where the whole model is GBs).

Engines: `transformers` (CPU or GPU, in-process `generate`). vLLM is the intended GPU engine and plugs in
here by registering another class with the same two methods.

Engine actors survive their processes: `start_engines` gives them `max_restarts` (Ray restarts a dead one, which
reloads the base model), `Engines` puts a deadline on every call and names the engine in its errors, and the
host tracks which pushed weights it holds (`version`), so a restarted engine cannot serve a rollout with the base
model's weights unnoticed.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch

from r1v.core.config import PenaltyScope
from r1v.core.errors import NotRetryable
from r1v.core.registry import LazyRegistry
from r1v.core.storage import stage_local
from r1v.data.collate import tiles_from_bytes
from r1v.model.tokens import IM_END, IMG_CONTEXT, IMG_END, IMG_START, PAD


@dataclass
class Request:
    """One prompt: token ids (images already expanded) and its tiles as uint8 bytes [n_tiles, 3, T, T].

    `repetition_penalty` is this request's own (DRLC, METHOD.md section 4: the penalty sets the chain's length
    per sample), `repetition_penalty_scope` the tokens it counts (`r1v.core.config.SamplingConfig`:
    `prompt_and_generated` or `generated`); None takes the call's sampling value.
    """

    prompt_ids: list[int]
    pixel_values: bytes = b""
    n_tiles: int = 0
    repetition_penalty: float | None = None
    repetition_penalty_scope: str | None = None


PENALTY_SCOPES: tuple[str, ...] = get_args(PenaltyScope)
"""`prompt_and_generated`: a repetition penalty counts the prompt's tokens and the completion's (transformers' and
vLLM's own); `generated`: only the completion's."""


def request_penalty(r: Request, sampling: dict[str, Any]) -> float:
    """The repetition penalty a request is generated with: its own, else the call's."""
    return float(r.repetition_penalty if r.repetition_penalty is not None
                 else sampling.get("repetition_penalty", 1.0))


def request_scope(r: Request, sampling: dict[str, Any]) -> str:
    """The repetition penalty's scope a request is generated with: its own, else the call's (default
    `prompt_and_generated`); a ValueError for any other value than `PENALTY_SCOPES`."""
    scope = (r.repetition_penalty_scope if r.repetition_penalty_scope is not None
             else sampling.get("repetition_penalty_scope") or "prompt_and_generated")
    if scope not in PENALTY_SCOPES:
        raise ValueError(f"repetition_penalty_scope {scope!r}: expected one of {', '.join(PENALTY_SCOPES)}")
    return scope


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool = field(default=False, metadata={"doc": "ended with an end-of-turn token"})


class RolloutEngine(ABC):
    @abstractmethod
    def generate(self, requests: list[Request], sampling: dict[str, Any], n: int, seed: int
                 ) -> list[list[Completion]]: ...

    @abstractmethod
    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> int: ...


ENGINES: LazyRegistry[type[RolloutEngine]] = LazyRegistry("rollout engine", {
    "transformers": "r1v.generation.engines:TransformersEngine",
    "vllm": "r1v.generation.engine_vllm:VLLMEngine",  # vLLM and its module are imported only when asked for
})


VLM_MODEL_TYPES = ("internvl",)


def is_vlm_dir(model_dir: str) -> bool:
    """Whether a checkpoint directory holds a VLM (InternVL: has a vision config) rather than a causal LM."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("model_type") in VLM_MODEL_TYPES or "vision_config" in cfg


class TransformersEngine(RolloutEngine):
    """`model.generate` on the model loaded from a checkpoint directory; batches all n*len(requests) rows.

    The directory may hold a VLM (`r1v.model.io.save_model`) or a text-only causal LM (`save_llm`, e.g. the
    reasoning LLM asked the text form of a question as a baseline); a text-only engine takes only requests
    without tiles.
    """

    def __init__(self, model_dir: str, max_batch: int = 64, device: str | None = None, logprobs: bool = True,
                 static_cache: bool = False, dtype: str = "float32") -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vision = is_vlm_dir(model_dir)
        if self.vision:
            # imported on use, to keep transformers, PIL, pyarrow out of light paths
            from r1v.model.assemble import tile_size
            from r1v.model.io import load_model

            self.model, self.tok = load_model(model_dir, dtype=getattr(torch, dtype))
            self.tile = tile_size(self.model)
        else:
            # imported on use, to keep transformers, PIL, pyarrow out of light paths
            from r1v.model.io import load_llm

            self.model, self.tok = load_llm(model_dir, dtype=getattr(torch, dtype))
            self.tile = 0
        self.model.to(self.device).eval()
        self.max_batch = max_batch
        # Evaluation needs no log-probs: without them no [batch, new tokens, vocab] logits are kept.
        self.logprobs = logprobs
        # A preallocated KV cache spares the per-step concatenation of the dynamic one: ~20% of CPU time on tiny
        # models. CPU only: on GPUs transformers compiles the model for a static cache (minutes).
        self.static_cache = static_cache and self.device == "cpu"
        vocab = self.tok.get_vocab()
        self.pad_id = self.tok.convert_tokens_to_ids(PAD) if PAD in vocab else self.tok.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tok.eos_token_id
        end = [self.tok.convert_tokens_to_ids(IM_END)] if IM_END in vocab else []
        self.stop_ids = sorted({*end, self.tok.eos_token_id, self.pad_id} - {None})
        # Image tokens in a completion would be read as image slots by the trainer: never sample them.
        self.suppress = [self.tok.convert_tokens_to_ids(t) for t in (IMG_CONTEXT, IMG_START, IMG_END) if t in vocab]

    def _tiles(self, r: Request) -> torch.Tensor | None:
        if not r.n_tiles:
            return None
        if not self.vision:
            raise ValueError(f"a request with {r.n_tiles} tiles sent to a text-only model")
        return torch.from_numpy(tiles_from_bytes(r.pixel_values, r.n_tiles, self.tile).copy())

    @torch.no_grad()
    def generate(self, requests: list[Request], sampling: dict[str, Any], n: int, seed: int
                 ) -> list[list[Completion]]:
        """HF `generate` takes one repetition penalty per call: rows are grouped by (penalty, scope) (first
        appearance order) and each group is generated as its own call, replaying the call's seed stream. A row's
        sample so depends only on the seed and its group's rows: a mixed-penalty call gives each group what a
        call with that group alone would (a per-row logits processor would couple rows through the shared
        sampler RNG)."""
        groups: dict[tuple[float, str], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((request_penalty(r, sampling), request_scope(r, sampling)), []).append(i)
        out: list[list[Completion]] = [[] for _ in requests]
        for (penalty, scope), idx in groups.items():
            s = {**sampling, "repetition_penalty": penalty, "repetition_penalty_scope": scope}
            rows = [(i, requests[i]) for i in idx for _ in range(n)]
            gen = torch.Generator().manual_seed(seed)
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start : start + self.max_batch]
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                for (i, _), comp in zip(chunk, self._generate_batch([r for _, r in chunk], s), strict=True):
                    out[i].append(comp)
        return out

    def _generate_batch(self, reqs: list[Request], s: dict[str, Any]) -> list[Completion]:
        longest = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(reqs):  # left padding: generation continues from the right edge
            ids[j, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, longest - len(r.prompt_ids):] = 1
        tiles = [t for t in (self._tiles(r) for r in reqs) if t is not None]
        temperature = float(s.get("temperature", 1.0))
        penalty = float(s.get("repetition_penalty", 1.0))
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            max_new_tokens=int(s.get("max_new_tokens", 64)), do_sample=temperature > 0,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, return_dict_in_generate=True,
            output_logits=self.logprobs, repetition_penalty=penalty, suppress_tokens=self.suppress or None,
        )
        if s.get("repetition_penalty_scope") == "generated" and penalty != 1.0:
            # The processors see input_ids: the left-padded prompts (`longest` wide in every row, with or without
            # images: the VLM's generate takes the ids and splices the image features in itself), then the
            # completion. Ignoring the first `longest` counts the completion's tokens only. A custom processor
            # (the built-in penalty off) runs after the token suppression (-inf stays -inf) and before the
            # temperature and top-p warpers, which `generate` appends after the custom processors.
            from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

            kwargs.update(repetition_penalty=1.0, logits_processor=LogitsProcessorList(
                [RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=longest)]))
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(s.get("top_p", 1.0)), top_k=0)
        if tiles:
            # imported on use, to keep transformers, PIL, pyarrow out of light paths
            from r1v.model.forward import normalize_pixels

            kwargs["pixel_values"] = normalize_pixels(torch.cat(tiles).to(self.device), self.model.dtype)
        res = self.model.generate(**kwargs)
        new = res.sequences[:, longest:].cpu()
        lp = (token_logprobs(torch.stack(res.logits, dim=1).cpu(), new, temperature)  # [B, T_new]
              if self.logprobs else None)
        comps = []
        for j in range(len(reqs)):
            toks = new[j].tolist()
            end = next((k for k, t in enumerate(toks) if t in self.stop_ids), None)
            keep = toks if end is None else toks[: end + 1]
            text_ids = keep if end is None else keep[:-1]
            comps.append(Completion(token_ids=keep, logprobs=lp[j, : len(keep)].tolist() if lp is not None else [],
                                    text=self.tok.decode(text_ids, skip_special_tokens=False),
                                    finished=end is not None))
        return comps

    @torch.no_grad()
    def continuation_logprobs(self, request: Request, continuations: list[list[int]]) -> list[float]:
        """The summed log-probability of each continuation's tokens right after the request's prompt (its images
        included), all continuations in one forward pass. What a guided choice picks from (`r1v serve`)."""
        if not continuations or any(not c for c in continuations):
            raise ValueError("continuation_logprobs: every continuation needs at least one token")
        start = len(request.prompt_ids)
        longest = start + max(len(c) for c in continuations)
        ids = torch.full((len(continuations), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(continuations):  # right padding: every prompt ends at `start`
            ids[j, : start + len(c)] = torch.tensor(request.prompt_ids + c)
            mask[j, : start + len(c)] = 1
        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        tiles = self._tiles(request)
        if tiles is not None:
            # imported on use, to keep transformers, PIL, pyarrow out of light paths
            from r1v.model.forward import normalize_pixels

            kwargs["pixel_values"] = normalize_pixels(tiles.repeat(len(continuations), 1, 1, 1).to(self.device),
                                                      self.model.dtype)
        logits = self.model(**kwargs).logits[:, start - 1 : longest - 1].cpu()  # position t predicts token t+1
        targets = ids[:, start:longest]
        lp = token_logprobs(logits, targets)
        return [float(lp[j, : len(c)].sum()) for j, c in enumerate(continuations)]

    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        params = dict(self.model.named_parameters())
        unknown = sorted(set(named_tensors) - set(params))
        if unknown:
            raise KeyError(f"update_weights: the engine's model has no parameters {unknown[:5]}")
        with torch.no_grad():
            for name, t in named_tensors.items():
                if params[name].shape != t.shape:
                    raise ValueError(f"update_weights: {name} has shape {tuple(params[name].shape)}, "
                                     f"got {tuple(t.shape)}")
                params[name].copy_(t.to(params[name].device, params[name].dtype))
        return len(named_tensors)


class StaleEngineError(RuntimeError):
    """Raised inside an engine actor asked for a rollout under weights it does not hold: it restarted (and
    reloaded the base model) since they were pushed, or a push into it did not complete."""


class EngineLostError(RuntimeError):
    """An engine actor died or restarted under a call. Ray restarts it (`max_restarts`): the caller waits for it
    (`Engines.ready`), pushes the weights again and re-runs the call."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


# Both are NotRetryable: the engine actors belong to the stage's driver, not to the Ray Train worker group, so a
# restart of the workers from their checkpoint would meet the same hung or dead actor again (a hung call also
# holds the actor's only thread, so every later call queues behind it). Failing at once spends no retries on it.
class EngineHungError(NotRetryable):
    """An engine call (or an engine's start) did not finish within its deadline."""


class EngineGoneError(NotRetryable):
    """An engine actor died and could not be brought back (its restarts used up, or it kept dying)."""


class EngineHost:
    """The Ray actor body: builds the engine named in config and forwards calls.

    `version` names the pushed weights the engine holds (None: the checkpoint's, as loaded): a weight push sends
    its parts with `update_weights(..., version=v, part=k)` and ends with `commit_weights(v, parts)`, which sets
    it only when every part arrived in this process, in order; `generate(..., version=v)` refuses to run under
    other weights."""

    def __init__(self, kind: str, model_dir: str, max_batch: int, torch_threads: int = 1, dtype: str = "float32",
                 options: dict[str, Any] | None = None) -> None:
        torch.set_num_threads(torch_threads)
        model_dir = str(stage_local(model_dir))  # an actor on another node than the driver: its own copy
        self.engine = ENGINES.get(kind)(model_dir, max_batch=max_batch, dtype=dtype, **(options or {}))
        self.version: int | None = None
        self._staged: tuple[int | None, int] = (None, 0)  # the push under way: its version, parts received

    def ready(self) -> dict[str, Any]:
        """Where the actor runs (for error messages, and the pid for tests that kill it) and its weights."""
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "version": self.version}

    def generate(self, requests: list[Request], sampling: dict[str, Any], n: int, seed: int,
                 version: int | None = None) -> list[list[Completion]]:
        if version is not None and version != self.version:
            raise StaleEngineError(f"asked for a rollout under weights {version}, holds {self.version} "
                                   "(None: the checkpoint's): the actor restarted since they were pushed")
        return self.engine.generate(requests, sampling, n, seed)

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None, part: int = 0
                       ) -> int:
        """Load `named_tensors`; with `version`, as part `part` (0, 1, ...) of that push: part 0 starts a push
        (a repeated one too), a part out of order (this process missed the earlier ones) spoils it."""
        if version is not None:
            self.version = None  # part old, part new until the push is committed
            v, got = self._staged
            self._staged = (version, 1) if part == 0 else (version, got + 1 if (v, got) == (version, part) else -1)
        return self.engine.update_weights(named_tensors)

    def commit_weights(self, version: int, parts: int) -> bool:
        """Mark the push of `version` complete if all its `parts` reached this process; whether they did."""
        if self._staged != (version, parts):
            return False
        self.version, self._staged = version, (None, 0)
        return True


def off_idle_driver_node() -> dict[str, str] | None:
    """A label selector that keeps actors off the driver's node when that node offers no CPU and no GPU (a
    cluster's head started with `num_cpus=0`, as the cluster's own work goes elsewhere); None otherwise (one
    machine, or a head that takes work). Ray places an actor that requests no resources (CPU engines with
    `num_cpus: 0`) on any node, the caller's first."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == me), None)
    if node is None or node["Resources"].get("CPU") or node["Resources"].get("GPU"):
        return None
    return {"ray.io/node-id": f"!{me}"}


def start_engines(kind: str, model_dir: str, num: int, num_cpus: float, num_gpus: float, max_batch: int,
                  torch_threads: int = 1, dtype: str = "float32", options: dict[str, Any] | None = None,
                  wait: bool = True, host: type[EngineHost] | None = None, max_restarts: int = 0,
                  ready_timeout_s: float | None = None):
    """Create `num` engine actors and (with `wait`) wait until each has loaded its model (at most `ready_timeout_s`
    seconds); `options` are further keyword arguments of the engine class, `host` a subclass of EngineHost to run
    instead. Ray restarts an actor that dies up to `max_restarts` times (it then loads the model again); calls
    are never retried by Ray itself, since a caller must first give a restarted engine its weights back."""
    import ray

    actor = ray.remote(host or EngineHost)
    where = off_idle_driver_node()
    handles = [actor.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0,
                             **({"label_selector": where} if where else {}))
               .remote(kind, model_dir, max_batch, torch_threads, dtype, options)
               for _ in range(num)]
    if wait:
        Engines(handles, ready_timeout_s=ready_timeout_s or 3600.0).ready()
    return handles


class Engines:
    """Calls on engine actors with a deadline each, and errors that name the engine (index, actor, node).

    A call whose actor died or restarted raises `EngineLostError` (the caller decides how to recover); one past
    its deadline `EngineHungError`; an actor that cannot come back `EngineGoneError`."""

    def __init__(self, handles: list[Any], call_timeout_s: float = 1200.0, ready_timeout_s: float = 3600.0) -> None:
        self.handles = list(handles)
        self.call_timeout_s, self.ready_timeout_s = call_timeout_s, ready_timeout_s
        self.where: list[dict[str, Any]] = [{} for _ in self.handles]

    def name(self, i: int) -> str:
        w = self.where[i]
        at = f", pid {w['pid']} on node {w['ip']} ({w['node_id'][:12]})" if w else ""
        return f"engine {i} (actor {self.handles[i]._actor_id.hex()}{at})"

    def call(self, method: str, indices: list[int], *args: Any, **kwargs: Any) -> list[Any]:
        """`method(*args, **kwargs)` on the engines `indices` at once; their results, within `call_timeout_s`."""
        refs = [getattr(self.handles[i], method).remote(*args, **kwargs) for i in indices]
        return self.get(indices, refs, method, self.call_timeout_s)

    def get(self, indices: list[int], refs: list[Any], what: str, timeout_s: float,
            setting: str = "engine.call_timeout_s", limit_s: float | None = None) -> list[Any]:
        """The results of `refs` (one call on each engine of `indices`), waiting at most `timeout_s` for all; a
        late one is reported against `setting`, whose value is `limit_s` (default `timeout_s`)."""
        import ray
        from ray.exceptions import RayActorError

        _, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if late:
            hung = ", ".join(self.name(i) for i, r in zip(indices, refs, strict=True) if r in late)
            limit = timeout_s if limit_s is None else limit_s
            raise EngineHungError(f"{hung}: {what} did not return within {limit:g} s ({setting}); the engine is "
                                  "hung or far slower than expected")
        out = []
        for i, ref in zip(indices, refs, strict=True):
            try:
                out.append(ray.get(ref))
            except (RayActorError, StaleEngineError) as e:
                # Ray 2.60: a call in flight when a restartable actor dies, and calls while it restarts, raise
                # ActorUnavailableError; calls to an actor Ray will not restart raise ActorDiedError
                raise EngineLostError(i, f"{self.name(i)} lost during {what}: {type(e).__name__}: "
                                      f"{_last_line(e)}") from e
        return out

    def ready(self, indices: list[int] | None = None) -> list[dict[str, Any]]:
        """Wait (at most `ready_timeout_s` in all) until the engines `indices` (default all) answer, after a start
        or a restart (a restarting actor refuses calls until it has loaded its model); where they run."""
        from ray.exceptions import ActorDiedError

        indices = list(range(len(self.handles))) if indices is None else indices
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                refs = [self.handles[i].ready.remote() for i in indices]
                where = self.get(indices, refs, "ready (starting, loading the model)",
                                 max(0.0, deadline - time.monotonic()), "engine.ready_timeout_s",
                                 self.ready_timeout_s)
                break
            except EngineLostError as e:
                if isinstance(e.__cause__, ActorDiedError):  # a fresh call to it: Ray will not bring it back
                    raise EngineGoneError(f"{self.name(e.index)} is dead and Ray will not restart it "
                                          f"(engine.max_restarts used up, or its model failed to load): "
                                          f"{_last_line(e.__cause__)}") from e
                if time.monotonic() > deadline:
                    raise EngineHungError(f"{e}; not back within engine.ready_timeout_s "
                                          f"{self.ready_timeout_s:g} s") from e
                time.sleep(0.5)  # restarting: ask again
        for i, w in zip(indices, where, strict=True):
            self.where[i] = w
        return where


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets) under logits/temperature; logits [N, T, V] already aligned with targets [N, T]."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
