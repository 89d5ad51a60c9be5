"""How far a world's two child LLMs moved from their base, matrix by matrix.

For each weight tensor: the relative distance ||child - base|| / ||base|| (Frobenius), grouped by where it sits
(embeddings, each decoder layer, the final norm, the output head): the median and the range over the group's
tensors, for the instruct and the reasoning child, and between the two children (||reasoning - instruct|| /
||instruct||). A distilled reasoning model and its instruct sibling of one base differ little in their early
layers; a world's children should too if re-assembly is to transfer as the paper's does.

    python bench/world_closeness.py [--world DIR ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def _group(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return f"layer {m.group(1)}"
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    return "final norm" if "norm" in name else name


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}


def distances(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per group: median, min and max over its tensors of ||b - a|| / ||a||. Tied weights appear once."""
    per: dict[str, list[float]] = {}
    for k, wa in a.items():
        if k not in b:
            continue
        per.setdefault(_group(k), []).append(float((b[k] - wa).norm() / wa.norm().clamp_min(1e-12)))
    return {g: {"median": median(v), "min": min(v), "max": max(v), "tensors": len(v)} for g, v in per.items()}


def closeness(world: Path) -> dict[str, dict[str, dict[str, float]]]:
    base = world / "base_llm"
    if not (base / "model.safetensors").is_file():
        raise SystemExit(f"{world} ships no base LM (base_llm/): nothing to measure against")
    w = {n: _weights(world / f"{n}_llm") for n in ("instruct", "reasoning")}
    b = _weights(base)
    return {"instruct_vs_base": distances(b, w["instruct"]), "reasoning_vs_base": distances(b, w["reasoning"]),
            "reasoning_vs_instruct": distances(w["instruct"], w["reasoning"])}


def _order(g: str) -> tuple[int, int]:
    if g == "embeddings":
        return (0, 0)
    if g.startswith("layer "):
        return (1, int(g.split()[1]))
    return (2, 0 if g == "final norm" else 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", nargs="+", default=[str(ROOT / "r1v" / "world" / "backbones")])
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    out = {}
    for world in args.world:
        res = out[world] = closeness(Path(world))
        print(f"\n{world}: relative distance, median over the group's tensors [min, max]")
        cols = list(res)
        print(f"{'':<12}" + "".join(f"{c:>28}" for c in cols))
        for g in sorted(res[cols[0]], key=_order):
            cells = []
            for c in cols:
                s = res[c].get(g)
                cells.append(f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]" if s else "-")
            print(f"{g:<12}" + "".join(f"{x:>28}" for x in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
