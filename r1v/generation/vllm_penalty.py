"""A repetition penalty over a request's generated tokens only, for vLLM (the `generated` scope of
`r1v.core.config.SamplingConfig.repetition_penalty_scope`).

vLLM's own `repetition_penalty` counts the prompt's tokens too. This is a custom logits processor of vLLM's V1
model runner (`vllm.v1.sample.logits_processor`), loaded once per engine (`LLM(logits_processors=[FQCN])`) and
enabled per request by `SamplingParams.extra_args[EXTRA_ARG]` = the penalty; requests without it are untouched.
The formula is transformers' `RepetitionPenaltyLogitsProcessor`: over the set of tokens the request generated so
far, a positive logit is divided by the penalty, a negative one multiplied. vLLM applies it with the other
processors that can change the argmax (logit bias), before its own penalties, temperature and top-p.

vLLM's Model Runner V2 (the default on GPUs with Triton from vLLM 0.32) has another processor interface, which
this module does not implement: `r1v.generation.engine_vllm` refuses the `generated` scope there.

Imports vLLM at module import: `r1v.generation.engine_vllm` imports it only when an engine starts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

EXTRA_ARG = "r1v_output_repetition_penalty"
"""The `SamplingParams.extra_args` key carrying a request's output-only repetition penalty."""
FQCN = "r1v.generation.vllm_penalty:OutputRepetitionPenalty"
"""How vLLM loads the processor (by name, so that tensor-parallel worker processes import it too; the engine
spells it out, not to import vLLM before it starts)."""


def output_penalty(params: SamplingParams) -> float | None:
    """The request's output-only penalty, None when it asks for none."""
    p = (params.extra_args or {}).get(EXTRA_ARG)
    return None if p is None else float(p)


class _RequestPenalty:
    """One request's state: which tokens its output holds (a vocabulary mask grown as tokens arrive, so that a
    step costs the new tokens, not the whole output)."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self.mask: torch.Tensor | None = None
        self.seen = 0  # output tokens already in the mask
        self.last = -1  # the last of them: the list changed under us (tokens discarded) when it is no longer there

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        n = len(output_ids)
        if n < self.seen or (self.seen and output_ids[self.seen - 1] != self.last):
            self.mask.zero_()
            self.seen = 0
        new = output_ids[self.seen : n]
        if -1 in new:  # async scheduling's placeholders, filled in before the step that needs them
            new = new[: new.index(-1)]
        if new:
            self.mask[torch.tensor(new, dtype=torch.long, device=logits.device)] = True
            self.seen += len(new)
            self.last = new[-1]
        if not self.seen:
            return logits
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(self.mask, penalised, logits)


class OutputRepetitionPenalty(AdapterLogitsProcessor):
    """vLLM V1 logits processor: the repetition penalty `SamplingParams.extra_args[EXTRA_ARG]` over the request's
    generated tokens only."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        p = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if p is not None and not (isinstance(p, int | float) and math.isfinite(p) and p > 0):
            raise ValueError(f"extra_args[{EXTRA_ARG!r}] must be a positive finite number, got {p!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        p = output_penalty(params)
        return None if p is None or p == 1.0 else _RequestPenalty(p)
