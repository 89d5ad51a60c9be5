"""Rule-based rewards, registered by name: `(completion, sample) -> float`.

`completion` is the generated text after the prompt (which already opened `<think>\n`); `sample` is the corpus
row (it carries `answer`). Config picks rewards and weights, e.g. `rewards: {accuracy: 1.0, format: 0.5}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from r1v.eval.extract import last_boxed
from r1v.model.tokens import THINK_END, THINK_START
from r1v.registry import Registry

RewardFn = Callable[[str, dict[str, Any]], float]
REWARDS: Registry[RewardFn] = Registry("reward")


def _norm(s: str) -> str:
    s = s.strip().strip("$").replace(" ", "").rstrip(".")
    try:
        f = float(s.replace(",", ""))
        return str(int(f)) if f.is_integer() else repr(f)
    except ValueError:
        return s


def extract_answer(completion: str) -> str | None:
    """The last `\\boxed{}` after the reasoning (text before `</think>` is ignored when the tag is there)."""
    tail = completion.split(THINK_END)[-1]
    return last_boxed(tail)


@REWARDS.register("accuracy")
def accuracy(completion: str, sample: dict[str, Any]) -> float:
    """1 when the last boxed answer equals the ground truth (numbers compared as numbers)."""
    got = extract_answer(completion)
    gold = str(sample.get("answer") or "")
    return float(got is not None and gold != "" and _norm(got) == _norm(gold))


_FORMAT = re.compile(r"^(?!.*" + re.escape(THINK_START) + r").+?" + re.escape(THINK_END) + r".*\\boxed\{.+\}",
                     re.DOTALL)


@REWARDS.register("format")
def format_reward(completion: str, sample: dict[str, Any]) -> float:
    """1 for `reasoning </think> answer-with-\\boxed{}` (the prompt already opened `<think>`), else 0."""
    return float(bool(_FORMAT.match(completion)) and completion.count(THINK_END) == 1)


def load_reward_modules(modules: list[str], needed: list[str]) -> None:
    """Import plugin modules (which register rewards), then check every needed reward exists."""
    import importlib

    for m in modules:
        importlib.import_module(m)
    for name in needed:
        REWARDS.get(name)  # raises KeyError listing the known rewards


def score(completions: list[str], samples: list[dict[str, Any]], weights: dict[str, float]
          ) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted total per completion, and each reward's raw values (for logging)."""
    per = {name: [REWARDS.get(name)(c, s) for c, s in zip(completions, samples, strict=True)] for name in weights}
    total = [sum(weights[n] * per[n][i] for n in weights) for i in range(len(completions))]
    return total, per
