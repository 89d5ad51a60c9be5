"""Peak host memory per worker while 2 training workers load a >= 1B-parameter model, against the model's bytes.

    python bench/load_memory.py                 # builds a random-init ~1.6B model once (bf16, ~3.2 GB on disk)
    python bench/load_memory.py --size tiny     # seconds; what the test runs

Two worker processes (a gloo process group, as `torchrun --nproc_per_node 2` would start them; Ray Train workers
call the same function) load the checkpoint with `r1v.train.loading.load_for_training` under ZeRO-3 in bf16,
then build the DeepSpeed engine on it. Baseline in the same run: the same two workers loading it whole with
`r1v.model.io.load_model` in bf16 (what every worker did before; the fp32 load it replaced needed twice that).
Target: ZeRO-3 peak RSS per worker <= model bytes / world size + 2 GB.

Peak RSS is the process's `ru_maxrss`; "added" subtracts the RSS measured just before loading (Python, torch,
transformers and DeepSpeed imported), so it is what loading itself cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """Current resident memory split as the kernel reports it: anonymous (heap) and file-backed (mapped files)."""
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            k, v = line.split(":")
            out[k + ":"] = int(v.split()[0]) * 1024
    return out


def malloc_trim() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(out: Path, size: str) -> dict:
    """Write a random-init VLM (bf16 safetensors, one file) and its tokenizer; returns its sizes."""
    from gpu_step import build_model

    from r1v.model.io import save_model

    model, tok = build_model("1b" if size == "1b" else "tiny", torch.bfloat16, "cpu", "sdpa")
    n = sum(p.numel() for p in model.parameters())
    save_model(model, tok, out)
    del model
    return {"params": n, "bytes_bf16": 2 * n}


def worker(args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    from r1v.core.config import OptimConfig, TrainerConfig
    from r1v.model.freeze import apply_freeze
    from r1v.model.io import load_model
    from r1v.train.engine import init_engine, prepare_deepspeed
    from r1v.train.loading import load_for_training

    deepspeed = prepare_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    trainer = TrainerConfig(num_workers=args.world, zero_stage=3, dtype="bfloat16")
    before = rss_now()
    t0 = time.time()
    if args.mode == "zero3":
        model, _ = load_for_training(args.dir, trainer)
    else:
        model, _ = load_model(args.dir, torch.bfloat16)
    loaded = time.time() - t0
    peak_load = peak_rss()
    now = rss_parts()
    malloc_trim()
    trimmed = rss_parts()
    apply_freeze(model, ["projector"])
    init_engine(model, trainer, OptimConfig(lr=1e-4), 10, 1)
    res = {"rank": args.rank, "mode": args.mode, "rss_before": before, "peak_after_load": peak_load,
           "peak_after_engine": peak_rss(), "load_seconds": loaded,
           "anon_after_load": now["RssAnon:"], "file_after_load": now["RssFile:"],
           "anon_after_trim": trimmed["RssAnon:"]}
    Path(args.result).write_text(json.dumps(res))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(model_dir: Path, mode: str, world: int, tmp: Path) -> list[dict]:
    port = free_port()
    procs, outs = [], []
    for r in range(world):
        out = tmp / f"{mode}-{r}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(world),
                                       "--port", str(port), "--dir", str(model_dir), "--mode", mode,
                                       "--result", str(out)],
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp / f"{mode}-{r}.log", "w")))
    for r, p in enumerate(procs):
        if p.wait() != 0:
            raise SystemExit(f"{mode} worker {r} failed:\n" + (tmp / f"{mode}-{r}.log").read_text()[-3000:])
    return [json.loads(o.read_text()) for o in outs]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["1b", "tiny"], default="1b")
    ap.add_argument("--workdir", default="/tmp/r1v-load-memory", help="where the model is built (kept for reruns)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for k in ("--rank", "--port"):
        ap.add_argument(k, type=int, help=argparse.SUPPRESS)
    for k in ("--dir", "--mode", "--result"):
        ap.add_argument(k, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    work = Path(a.workdir) / a.size
    model_dir = work / "model"
    meta = work / "sizes.json"
    if not meta.is_file():
        print(f"building a random-init {a.size} model in {model_dir} ...", flush=True)
        sys.path.insert(0, str(ROOT / "bench"))
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(build(model_dir, a.size)))
    sizes = json.loads(meta.read_text())
    out = {"params": sizes["params"], "model_bytes_bf16": sizes["bytes_bf16"], "world": a.world}
    for mode in ("zero3", "full"):
        res = run_workers(model_dir, mode, a.world, work)
        out[mode] = {"peak_rss_gib": [r["peak_after_load"] / GIB for r in res],
                     "added_gib": [(r["peak_after_load"] - r["rss_before"]) / GIB for r in res],
                     "peak_rss_with_engine_gib": [r["peak_after_engine"] / GIB for r in res],
                     "load_seconds": [r["load_seconds"] for r in res],
                     "anon_after_load_gib": [r["anon_after_load"] / GIB for r in res],
                     "file_after_load_gib": [r["file_after_load"] / GIB for r in res],
                     "anon_after_trim_gib": [r["anon_after_trim"] / GIB for r in res]}
    target = sizes["bytes_bf16"] / a.world / GIB + 2
    out["target_gib"] = target
    out["zero3_meets_target"] = max(out["zero3"]["peak_rss_gib"]) <= target
    print(f"model: {sizes['params'] / 1e9:.2f}B parameters, {sizes['bytes_bf16'] / GIB:.2f} GiB in bf16; "
          f"{a.world} workers; target per worker <= {target:.2f} GiB")
    for mode, label in (("zero3", "ZeRO-3 streamed (load_for_training)"), ("full", "whole model (load_model)")):
        r = out[mode]
        print(f"  {label:<38} peak RSS per worker {', '.join(f'{v:.2f}' for v in r['peak_rss_gib'])} GiB "
              f"(loading added {', '.join(f'{v:.2f}' for v in r['added_gib'])}); with the engine "
              f"{', '.join(f'{v:.2f}' for v in r['peak_rss_with_engine_gib'])} GiB; "
              f"load {max(r['load_seconds']):.1f} s; after loading: heap "
              f"{', '.join(f'{v:.2f}' for v in r['anon_after_load_gib'])} GiB (after malloc_trim "
              f"{', '.join(f'{v:.2f}' for v in r['anon_after_trim_gib'])}), mapped files "
              f"{', '.join(f'{v:.2f}' for v in r['file_after_load_gib'])} GiB")
    print(f"  ZeRO-3 meets the target: {out['zero3_meets_target']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
