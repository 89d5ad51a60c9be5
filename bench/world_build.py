"""Rebuild the miniature world from scratch and compare it with the shipped one.

The shipped backbones (r1v/world/backbones) were made by `r1v world build`; this script reruns that build
(same config from the shipped world.json unless overridden; minutes on 2 cores) into a temporary directory
and prints both builds' figures: text accuracy of the instruct and reasoning LLMs on held-out problems (by
level) and the vision tower's held-out digit accuracy. It exits 1 when the rebuilt world does not reach the
documented (shipped) figures: reasoning text accuracy at least the shipped one minus 0.05, at least 0.2 above
the rebuilt instruct LLM, and digit accuracy >= 0.95.

    python bench/world_build.py [--out DIR] [key=value build overrides ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from r1v.core.overrides import apply_overrides
    from r1v.world.build import WORLD_DIR, WorldBuildConfig, build_world, verify_world

    shipped = verify_world(WORLD_DIR)
    cfg = WorldBuildConfig.model_validate(apply_overrides(shipped["build_config"], args.overrides))
    out = args.out or tempfile.mkdtemp(prefix="r1v-world-")
    rebuilt = build_world(out, cfg)
    print(f"\n{'':<34}{'shipped':>10}{'rebuilt':>10}")
    for name in ("instruct", "reasoning"):
        a, b = shipped["text_accuracy"][name], rebuilt["text_accuracy"][name]
        print(f"{name + ' LLM, text accuracy':<34}{a['accuracy']:>10.3f}{b['accuracy']:>10.3f}")
        for lv in b["by_level"]:
            print(f"{'  level ' + lv:<34}{a['by_level'].get(lv, float('nan')):>10.3f}{b['by_level'][lv]:>10.3f}")
    va, vb = shipped["vision"]["digit_accuracy_test"], rebuilt["vision"]["digit_accuracy_test"]
    print(f"{'vision tower, digit accuracy':<34}{va:>10.3f}{vb:>10.3f}")
    print(f"{'build seconds':<34}{shipped['seconds']:>10.0f}{rebuilt['seconds']:>10.0f}")
    r, i = rebuilt["text_accuracy"]["reasoning"]["accuracy"], rebuilt["text_accuracy"]["instruct"]["accuracy"]
    ok = r >= shipped["text_accuracy"]["reasoning"]["accuracy"] - 0.05 and r - i >= 0.2 and vb >= 0.95
    print(json.dumps({"rebuilt_at": out, "meets_floors": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
