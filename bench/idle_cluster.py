"""What an idle local Ray cluster costs: starts one as `r1v run` does (`r1v.cli.app.init_ray`, 2 CPUs, dashboard on),
lets it settle, then samples the CPU time of every Ray process over a window and prints cores used, per process
and in all. `--no-dashboard` starts it without the dashboard, for comparison. Linux only.

    python bench/idle_cluster.py [--settle 20] [--window 30] [--no-dashboard]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def ray_processes() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds) of every process whose command line mentions ray."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "ray" in cmd and int(d.name) != os.getpid():
            out[int(d.name)] = (cmd[:100], (int(fields[11]) + int(fields[12])) / TICK)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after start-up before the window")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--no-dashboard", action="store_true")
    args = ap.parse_args()
    import ray

    from r1v.cli.app import init_ray
    from r1v.core.loopback import loopback_only

    if args.no_dashboard:
        loopback_only()
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    else:
        init_ray(None, 2, verbose=False)
    time.sleep(args.settle)
    a, t0 = ray_processes(), time.monotonic()
    time.sleep(args.window)
    b, dt = ray_processes(), time.monotonic() - t0
    rows = sorted(((t - a.get(pid, ("", 0.0))[1]) / dt, cmd) for pid, (cmd, t) in b.items())
    for cores, cmd in reversed(rows):
        if cores >= 0.002:
            print(f"{cores:6.3f}  {cmd}")
    print(f"idle cluster: {sum(c for c, _ in rows):.3f} cores over {dt:.0f} s ({len(b)} processes)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
