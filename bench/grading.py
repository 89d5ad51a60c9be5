"""Benchmark: grading throughput for 2,500 MATH-500 responses, 1 worker vs N workers.

Responses are built from the gold answers, five per item: the answer boxed after a think block, the answer
restated in another form (decimal / ``\\dfrac`` / spaces), a perturbed (wrong) answer, an unboxed
"the answer is" sentence, and a perturbed symbolic variant, so the fast string path, the numeric path and the
SymPy path are all exercised.

    python bench/grading.py [--workers N] [--timeout S]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1v.eval.grading import grade_predictions  # noqa: E402
from r1v.eval.items import default_data_root  # noqa: E402
from r1v.eval.loaders import load_math500  # noqa: E402
from r1v.eval.predictions import Prediction  # noqa: E402


def _perturb(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same shape: bump the first number, or append a term."""
    m = re.search(r"\d+", answer)
    if m:
        return answer[: m.start()] + str(int(m.group()) + rng.randint(1, 9)) + answer[m.end() :]
    return answer + "+1"


def _restate(answer: str) -> str:
    """The same answer written differently (what a model might box)."""
    if re.fullmatch(r"-?\d+", answer):
        return f"{answer}.0"
    m = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", answer)
    if m:
        return f"\\dfrac{{{m.group(1)}}}{{{m.group(2)}}}"
    return answer.replace(",", ", ").replace("\\left", "").replace("\\right", "")


_FILLER = "Let $x = 3$; then $x^2 + 2x = 15$, so we check $\\frac{15}{3} = 5$ and move on. "


def make_math500_responses(
    root: Path, samples: int = 5, seed: int = 0, think_chars: int = 0
) -> list[Prediction]:
    """``500 * samples`` predictions in r1v's format, built from MATH-500 gold answers.

    ``think_chars`` pads each think block with that much reasoning-like text, as real R1V outputs have.
    """
    rng = random.Random(seed)
    pad = (_FILLER * (think_chars // len(_FILLER) + 1))[:think_chars]
    preds = []
    for item in load_math500(root):
        gold = str(item.answer)
        bodies = [
            f"<think>Try \\boxed{{{_perturb(gold, rng)}}} first... no.</think>\n"
            f"So\nAnswer: \\boxed{{{gold}}}",
            f"<think>ok</think>The result is $\\boxed{{{_restate(gold)}}}$.",
            f"<think>hmm</think>Answer: \\boxed{{{_perturb(gold, rng)}}}",
            f"Reasoning here. The answer is {gold}",
            f"<think>x</think>Answer: \\boxed{{{gold} + x - x + 2}}",
        ]
        for k in range(samples):
            body = bodies[k % len(bodies)].replace("<think>", "<think>" + pad, 1)
            preds.append(Prediction(id=item.id, response=body, sample=k))
    return preds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--think-chars", type=int, default=4000, help="reasoning text per response")
    args = parser.parse_args()
    root = default_data_root()
    preds = make_math500_responses(root, args.samples, think_chars=args.think_chars)
    timings = {}
    for workers in sorted({1, args.workers}):
        start = time.perf_counter()
        report = grade_predictions("math500", preds, root, workers=workers, timeout=args.timeout)
        timings[workers] = time.perf_counter() - start
        print(
            f"workers={workers}: {len(preds)} responses in {timings[workers]:.2f} s "
            f"= {len(preds) / timings[workers]:.0f} items/s; {report.correct}/{report.total} correct"
        )
    if args.workers != 1:
        print(f"speedup {args.workers} workers vs 1: {timings[1] / timings[args.workers]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
