"""The `local` scorer: a Hugging Face reward or judge model in Ray actors (in this process without Ray).

Two heads:
- `reward`: `AutoModelForSequenceClassification` over the conversation (the question as the user turn, the
  response as the assistant turn, through the tokenizer's chat template; or the rendered `prompt` when set).
  One label: `scale * logit + offset`, squashed into the score range with a sigmoid (`squash: sigmoid`) or taken
  as is (`none`: out-of-range scores are quarantined). Several labels: label k is the k-th of evenly spaced
  scores over the range; `reduce` takes the probability-weighted mean or the argmax.
- `judge`: a causal LM (an r1v VLM or any local causal LM) asked `prompt` through its chat template, greedy,
  through r1v's rollout engine; its reply is parsed as the `openai` scorer parses one.

Inputs are text only (the row's `<image>` markers stay as text): image-aware judges go through `openai`. An input
longer than `max_length` is quarantined (`too_long`), never truncated, since a truncated response is another
response.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from r1v.judges.base import (
    NO_RESPONSE,
    NON_FINITE,
    TOO_LONG,
    UNPARSABLE,
    Scorer,
    ScorerConfig,
    Verdict,
    check_template,
    compile_pattern,
    parse_score,
    render,
    row_fields,
    uses_field,
)
from r1v.judges.openai_client import DEFAULT_JUDGE_PROMPT


class LocalScorerConfig(ScorerConfig):
    kind: Literal["local"] = "local"
    model: str = Field(description="local HF model directory (no hub access)")
    head: Literal["reward", "judge"] = Field(description="reward: sequence-classification head; judge: a causal "
                                             "LM whose reply holds the score")
    prompt: str | None = Field(None, description="template (fields: id, source, answer, question, response, "
                               "meta); judge: the user message (default: the openai scorer's judge prompt); "
                               "reward: the whole input instead of the chat-templated conversation")
    num_actors: int = Field(1, ge=1, description="Ray actors, each holding the model")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor")
    torch_threads: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(8, ge=1, description="rows per forward / generate call")
    max_length: int = Field(4096, ge=8, description="longest input in tokens; longer rows are quarantined")
    scale: float = Field(1.0, description="reward, one label: score = squash(scale * logit + offset)")
    offset: float = 0.0
    squash: Literal["sigmoid", "none"] = Field("sigmoid", description="reward, one label: map into the range")
    reduce: Literal["expected", "argmax"] = Field("expected", description="reward, several labels")
    max_new_tokens: int = Field(64, ge=1, description="judge: reply length")
    score_pattern: str | None = Field(None, description="judge: regex with a group around the score")

    @model_validator(mode="after")
    def _check(self) -> LocalScorerConfig:
        if self.prompt is not None:
            check_template(self.prompt)
        compile_pattern(self.score_pattern)
        return self


class LocalScorerHost:
    """The actor body (also used in-process): loads the model once, scores batches of text fields."""

    def __init__(self, config: dict[str, Any], low: float, high: float) -> None:
        import torch

        self.c = LocalScorerConfig.model_validate(config)
        torch.set_num_threads(self.c.torch_threads)
        self.low, self.high = low, high
        dtype = getattr(torch, self.c.dtype)
        device = "cuda" if self.c.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.c.head == "reward":
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(self.c.model, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.c.model, dtype=dtype, local_files_only=True).to(device).eval()
            if self.model.config.pad_token_id is None:
                self.model.config.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None \
                    else self.tok.eos_token_id
        else:
            # imported on use, to keep torch out of light paths
            from r1v.generation.engines import TransformersEngine

            self.engine = TransformersEngine(self.c.model, max_batch=self.c.batch_size, device=device,
                                             logprobs=False, dtype=self.c.dtype)
            self.tok = self.engine.tok
            self.rx = compile_pattern(self.c.score_pattern)
        self.device = device

    def ready(self) -> bool:
        return True

    def _reward_text(self, f: dict[str, Any]) -> str:
        if self.c.prompt is not None:
            return render(self.c.prompt, f)
        conv = [{"role": "user", "content": f["question"]}, {"role": "assistant", "content": f["response"]}]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(conv, tokenize=False)
        return f"{f['question']}\n\n{f['response']}"

    def _judge_ids(self, f: dict[str, Any]) -> list[int]:
        text = render(self.c.prompt or DEFAULT_JUDGE_PROMPT, f)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def score(self, fields: list[dict[str, Any]]) -> list[tuple[float | None, str, str]]:
        """(score, reason, detail) per row, in order (tuples: they cross the actor boundary cheaply). A row
        without a response is quarantined when the input needs one (a reward head always does)."""
        template = self.c.prompt or (DEFAULT_JUDGE_PROMPT if self.c.head == "judge" else None)
        needs = template is None or uses_field(template, "response")
        missing = [needs and not f["response"].strip() for f in fields]
        todo = [f for f, m in zip(fields, missing, strict=True) if not m]
        done = iter((self._reward if self.c.head == "reward" else self._judge)(todo) if todo else [])
        return [(None, NO_RESPONSE, "the row has no assistant turn to score") if m else next(done) for m in missing]

    def _reward(self, fields: list[dict[str, Any]]) -> list[tuple[float | None, str, str]]:
        import torch

        out: list[tuple[float | None, str, str]] = [(None, "", "")] * len(fields)
        enc = [self.tok(self._reward_text(f), add_special_tokens=True)["input_ids"] for f in fields]
        fit = []
        for i, ids in enumerate(enc):
            if len(ids) > self.c.max_length:
                out[i] = (None, TOO_LONG, f"{len(ids)} tokens, max_length is {self.c.max_length}")
            else:
                fit.append(i)
        pad = self.model.config.pad_token_id
        for s in range(0, len(fit), self.c.batch_size):
            idx = fit[s : s + self.c.batch_size]
            longest = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(idx):  # right padding: the head reads the last non-pad token
                ids[j, : len(enc[i])] = torch.tensor(enc[i])
                mask[j, : len(enc[i])] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for j, i in enumerate(idx):
                out[i] = self._reward_score(logits[j].float().cpu())
        return out

    def _reward_score(self, logits: Any) -> tuple[float | None, str, str]:
        import torch

        if not torch.isfinite(logits).all():
            return None, NON_FINITE, f"logits {logits.tolist()}"
        if logits.numel() == 1:
            raw = self.c.scale * float(logits[0]) + self.c.offset
            if self.c.squash == "sigmoid":
                return self.low + (self.high - self.low) / (1 + math.exp(-raw)), "", ""
            return raw, "", ""
        k = logits.numel()
        values = torch.linspace(self.low, self.high, k)
        if self.c.reduce == "argmax":
            return float(values[int(logits.argmax())]), "", ""
        return float((torch.softmax(logits, -1) * values).sum()), "", ""

    def _judge(self, fields: list[dict[str, Any]]) -> list[tuple[float | None, str, str]]:
        # imported on use, to keep torch, numpy, tqdm out of light paths
        from r1v.generation.engines import Request

        out: list[tuple[float | None, str, str]] = [(None, "", "")] * len(fields)
        reqs, idx = [], []
        for i, f in enumerate(fields):
            ids = self._judge_ids(f)
            if len(ids) > self.c.max_length:
                out[i] = (None, TOO_LONG, f"{len(ids)} tokens, max_length is {self.c.max_length}")
            else:
                reqs.append(Request(ids))
                idx.append(i)
        if reqs:
            sampling = {"temperature": 0.0, "max_new_tokens": self.c.max_new_tokens}
            for i, group in zip(idx, self.engine.generate(reqs, sampling, 1, 0), strict=True):
                text = group[0].text
                score = parse_score(text, self.rx)
                out[i] = (score, "", "") if score is not None else (None, UNPARSABLE, f"reply: {text[:500]!r}")
        return out


class LocalScorer(Scorer):
    """Rows are split into `batch_size` chunks spread over `num_actors` actors (only their text travels)."""

    Config = LocalScorerConfig

    def __init__(self, config: LocalScorerConfig, low: float, high: float) -> None:
        super().__init__(config, low, high)
        self.actors: list[Any] = []
        self.local: LocalScorerHost | None = None

    def open(self) -> None:
        import ray

        c: LocalScorerConfig = self.config  # type: ignore[assignment]
        args = (c.model_dump(), self.low, self.high)
        if not ray.is_initialized():
            self.local = LocalScorerHost(*args)
            return
        actor = ray.remote(LocalScorerHost).options(num_cpus=c.num_cpus, num_gpus=c.num_gpus)
        self.actors = [actor.remote(*args) for _ in range(c.num_actors)]
        ray.get([a.ready.remote() for a in self.actors])  # a model that fails to load fails here, by name

    def close(self) -> None:
        import ray

        for a in self.actors:
            if ray.is_initialized():
                ray.kill(a)
        self.actors = []
        self.local = None

    def score(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        import ray

        c: LocalScorerConfig = self.config  # type: ignore[assignment]
        fields = [row_fields(r) for r in rows]
        chunks = [fields[s : s + c.batch_size] for s in range(0, len(fields), c.batch_size)]
        if self.local is not None:
            results = [self.local.score(ch) for ch in chunks]
        else:
            refs = [self.actors[k % len(self.actors)].score.remote(ch) for k, ch in enumerate(chunks)]
            results = ray.get(refs)
        return [Verdict(s, r, d) for chunk in results for s, r, d in chunk]
