"""What the miniature-world benches share: running `r1v` as a user does, reading a stage's outputs, the seed's base
run (the demo's first five stages, reused when finished) and the command-line options for the world."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "workflows" / "tiny.yaml"
BASE_STAGES = ["data", "models", "align", "reassemble", "sft"]


def r1v(*args: str) -> None:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "r1v.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"r1v {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-4000:]}")
    print(f"  r1v {args[0]} {args[1]}: {time.time() - t0:.0f} s", flush=True)


def outputs(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / "stages" / stage / "state.json").read_text())["outputs"]


def base_run(base: Path, seed: int, args: argparse.Namespace) -> Path:
    """`r1v run workflows/tiny.yaml seed=S --only data models align reassemble sft` on `args.world` (with the
    overthinking SFT corpus when `args.overthink`, images of varying clarity when `args.clarity`) into `base`,
    unless it finished there before."""
    if not (base / "stages" / "sft" / "model" / "config.json").exists():
        over = [f"seed={seed}"] + ([f"stages.models.config.world={args.world}"] if args.world else []) \
            + (["stages.data.config.overthink={}"] if args.overthink else []) \
            + (["stages.data.config.clarity={}"] if args.clarity else [])
        r1v("run", str(TINY), *over, "--run-dir", str(base), "--only", *BASE_STAGES)
    return base


def add_world_args(ap: argparse.ArgumentParser, run_root: Path, tokens_help: str) -> None:
    ap.add_argument("--seeds", type=int, nargs="*", default=[10, 11, 12])
    ap.add_argument("--world", help="a built world directory (default: the shipped world)")
    ap.add_argument("--overthink", action="store_true", help="the SFT corpus with the world's redundant checks")
    ap.add_argument("--clarity", action="store_true", help="images blurred to varying degrees in every corpus")
    ap.add_argument("--max-new-tokens", type=int, default=128, help=tokens_help)
    ap.add_argument("--run-root", type=Path, default=run_root)
    ap.add_argument("--runs-only", action="store_true", help="read finished runs under --run-root, run nothing")
    ap.add_argument("--json", type=Path)


def parse_world_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    args = ap.parse_args()
    if args.world:
        args.world = str(Path(args.world).resolve())
    return args
