"""Where a command's CPU time goes, by kind of process: runs COMMAND, samples every process's CPU time
(/proc/PID/stat) and title every `--every` seconds, and prints the CPU seconds of each kind (the pytest workers,
Ray Train workers, engine actors, raylets, MLflow and S3 servers, ...) and the machine's busy CPU seconds.
Linux only. A process that lives less than one interval is missed (the "unattributed" line).

    python bench/cpu_by_process.py [--every 1] [--json out.json] -- python -m pytest -q --timeout 900
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def busy_ticks() -> tuple[int, int]:
    v = list(map(int, Path("/proc/stat").read_text().splitlines()[0].split()[1:]))
    return sum(v[:8]) - v[3] - v[4], sum(v[:8])


def sample() -> dict[int, tuple[float, str]]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(d)] = ((int(fields[11]) + int(fields[12])) / TICK, cmd)
    return out


RULES = [  # (kind, pattern on the command line), first match wins
    ("ray: train worker", r"^ray::RayTrainWorker"), ("ray: train controller", r"^ray::TrainController"),
    ("ray: engine actor", r"^ray::(EngineHost|EvalEngineHost|.*Engine)"),
    ("ray: serve", r"^ray::(Serve|HTTPProxy|ProxyActor)|ServeReplica"),
    ("ray: data task", r"^ray::(Read|Map|.*->|SplitCoordinator)"),
    ("ray: train helper actors", r"^ray::(PlacementGroupCleaner|DatasetManager|PreemptionWatcher|"
                                 r"SynchronizationActor|TrainStateActor)"),
    ("ray: data helper actors", r"^ray::(_StatsActor|_AutoscalingCoordinatorActor)"),
    ("ray: idle or other worker", r"^ray::|default_worker\.py"), ("ray: raylet", r"^\S*/raylet/raylet"),
    ("ray: gcs", r"gcs_server"),
    ("ray: dashboard and agents", r"dashboard|agent|log_monitor|runtime_env"),
    ("vllm engine core", r"VLLM|EngineCore"), ("mlflow server", r"mlflow|uvicorn|gunicorn|huey"),
    ("s3 server", r"moto"), ("jupyter kernel", r"ipykernel"), ("r1v CLI", r"r1v\.cli|bin/r1v"),
    ("pytest workers", r"execnet|pytest|xdist"), ("python, other", r"python"),
]


def kind(cmd: str) -> str:
    return next((k for k, pat in RULES if re.search(pat, cmd)), "other")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = sample()
    b0, t0, w0 = *busy_ticks(), time.time()
    proc = subprocess.Popen(cmd)
    seen: dict[int, tuple[float, str, str]] = {}  # pid -> (cpu s, last title, kind first seen as non-idle)
    while proc.poll() is None:
        for pid, (cpu, title) in sample().items():
            base = start.get(pid, (0.0, ""))[0] if pid in start else 0.0
            k = kind(title)
            prev = seen.get(pid)
            # a Ray worker process starts idle and takes an actor's or a task's title: the specific kind wins; an
            # exited process not yet reaped has no command line: it keeps its kind
            keep = prev[2] if prev and (k == "ray: idle or other worker" or not title) else k
            seen[pid] = (cpu - base, title, keep)
        time.sleep(args.every)
    b1, t1, w1 = *busy_ticks(), time.time()
    by, count = collections.Counter(), collections.Counter()
    for cpu, _, k in seen.values():
        by[k] += cpu
        count[k] += 1
    busy = (b1 - b0) / TICK
    print(f"\nwall {w1 - w0:.0f} s, machine busy {busy:.0f} CPU-s ({busy / ((t1 - t0) / TICK) * os.cpu_count():.2f} "
          f"of {os.cpu_count()} cores on average), exit {proc.returncode}")
    for k, v in by.most_common():
        print(f"  {v:8.0f} CPU-s  {k} ({count[k]} processes)")
    print(f"  {busy - sum(by.values()):8.0f} CPU-s  unattributed (short-lived processes, the kernel)")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": w1 - w0, "busy_cpu_s": busy, "by_kind": dict(by),
                                               "processes": dict(count)}, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
