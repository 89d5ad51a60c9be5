"""What a repetition penalty does to a world's reasoning LLM, per level: chain tokens, redundant checks, accuracy.

    python bench/world_penalty.py [--world DIR] [--per-level N] [--penalties 1.0,1.2,1.5,2.0] [--json OUT]

The reasoning LLM of the world (default: the shipped one) answers N held-out text problems per level (test-split
digit tuples, seed 12345 as the build's own text figures) greedily, through r1v's transformers rollout engine,
at each penalty in each scope (`prompt_and_generated`: what transformers and vLLM do by default;
`generated`: prompt tokens ignored; `r1v.core.config.SamplingConfig.repetition_penalty_scope`). Per level it
prints the mean chain tokens (generated up to and including `</think>`, or all when it never comes), the
`Check:` restatements per chain (the overthinking habit, `r1v.world.domain.overthought_chain`), the share of
chains that never end within the budget, and the accuracy. Greedy, so a rerun prints the same figures on the
same machine; `--temperature T` samples instead (seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCOPES = ("prompt_and_generated", "generated")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", help="a built world directory (default: the shipped one)")
    ap.add_argument("--per-level", type=int, default=200, help="held-out problems per level (default 200)")
    ap.add_argument("--penalties", default="1.0,1.2,1.5,2.0")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else sampled, seed 0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from r1v.data.prompt import encode_prompt
    from r1v.generation.engines import Request, TransformersEngine
    from r1v.grading.rewards import accuracy
    from r1v.world.build import WORLD_DIR, verify_world
    from r1v.world.domain import CHECK, THINK_END, text_question
    from r1v.world.text import text_test_problems

    torch.set_num_threads(args.threads)
    world = Path(args.world) if args.world else WORLD_DIR
    verify_world(world)
    engine = TransformersEngine(str(world / "reasoning_llm"), max_batch=256, device="cpu", logprobs=False)
    problems = [p for p in text_test_problems(3 * args.per_level, seed=12345)]
    prompts = [encode_prompt([{"role": "user", "content": text_question(p)}], engine.tok, [], 1) for p in problems]
    think_end = engine.tok.convert_tokens_to_ids(THINK_END)
    figures: dict[str, dict] = {}
    how = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature:g}, seed 0"
    print(f"world {world}: {args.per_level} held-out text problems per level, {how}, at most "
          f"{args.max_new_tokens} new tokens")
    print(f"{'scope':<21} {'penalty':>7} {'level':>5} {'chain tokens':>12} {'checks':>7} {'unended':>8} "
          f"{'accuracy':>8}")
    for scope in SCOPES:
        for penalty in (float(x) for x in args.penalties.split(",")):
            if penalty == 1.0 and scope != SCOPES[0]:
                continue  # no penalty: the scope changes nothing (tests/rl/test_penalty_scope.py)
            t0 = time.time()
            reqs = [Request(ids, repetition_penalty=penalty, repetition_penalty_scope=scope) for ids in prompts]
            outs = engine.generate(reqs, {"temperature": args.temperature, "top_p": 1.0,
                                          "max_new_tokens": args.max_new_tokens}, 1, 0)
            rows: dict[int, list[tuple[int, int, bool, bool]]] = {}
            for p, (c,) in zip(problems, outs, strict=True):
                toks = c.token_ids
                chain = toks.index(think_end) + 1 if think_end in toks else len(toks)
                text = c.text
                rows.setdefault(p.level, []).append(
                    (chain, text.split(THINK_END)[0].count(CHECK), not c.finished,
                     bool(accuracy(text, {"answer": str(p.answer)}))))
            key = f"{scope}@{penalty:g}"
            figures[key] = {}
            for level, v in sorted(rows.items()):
                n = len(v)
                f = {"n": n, "chain_tokens": sum(r[0] for r in v) / n, "checks": sum(r[1] for r in v) / n,
                     "unended": sum(r[2] for r in v) / n, "accuracy": sum(r[3] for r in v) / n}
                figures[key][str(level)] = f
                print(f"{scope:<21} {penalty:>7.2f} {level:>5} {f['chain_tokens']:>12.1f} {f['checks']:>7.2f} "
                      f"{f['unended']:>8.2f} {f['accuracy']:>8.3f}")
            print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"world": str(world), "per_level": args.per_level, "temperature":
                                         args.temperature,
                                         "max_new_tokens": args.max_new_tokens, "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
