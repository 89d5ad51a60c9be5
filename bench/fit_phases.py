"""Where one Ray Train fit's time goes: a 2-worker fit of a tiny model (one step, one portable checkpoint) at
ZeRO-3 and at ZeRO-0 on a local 2-CPU Ray cluster, each rank stamping when its loop starts, has imported
`r1v.train.sft`, has its DeepSpeed engine, has restored (nothing) and has saved; seconds from the start of `fit`.
Set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the environment to compare Ray Train's polling intervals.

    python bench/fit_phases.py            # Ray's default 2 s polls
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 python bench/fit_phases.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from r1v.core.config import TrainerConfig


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj, self.out = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)
        self.emb.requires_grad_(False)
        self.out.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(self.emb(ids))))


def loop(cfg: dict) -> None:
    stamps = {"enter": time.time()}
    import r1v.train.sft  # noqa: F401  (what a stage's worker imports)

    stamps["imported"] = time.time()
    from r1v.core.config import OptimConfig
    from r1v.train import checkpoint
    from r1v.train.engine import init_engine
    from r1v.train.launch import setup_worker
    from r1v.train.sft import token_nll

    trainer = TrainerConfig.model_validate(cfg["trainer"])
    rank, _ = setup_worker(trainer)
    engine = init_engine(TinyLM(), trainer, OptimConfig(lr=0.05, grad_clip=0.0, warmup_ratio=0.5), 6, 2)
    stamps["engine"] = time.time()
    checkpoint.restore(engine, rank, portable=True)
    stamps["restored"] = time.time()
    ids = torch.randint(0, 16, (4, 8))
    nll, _ = token_nll(engine(ids), ids)
    engine.backward(nll)
    engine.step()
    checkpoint.save(engine, 1, {"step": 1}, {}, rank, portable=True)
    stamps["saved"] = time.time()
    with open(cfg["log"], "a") as f:
        f.write(json.dumps({"rank": rank, **stamps}) + "\n")


def main() -> int:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    import ray.cloudpickle

    from r1v.train.launch import fit

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    print(f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', 'unset (2 s)')}")
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "stamps.jsonl"
        for zero in (3, 0):
            log.write_text("")
            trainer = TrainerConfig(num_workers=2, zero_stage=zero, max_failures=0)
            t0 = time.time()
            fit(loop, {"trainer": trainer.model_dump(), "log": str(log)}, trainer, Path(d) / f"z{zero}", 2)
            t1 = time.time()
            print(f"ZeRO-{zero}: fit {t1 - t0:.1f} s")
            for r in sorted(map(json.loads, log.read_text().splitlines()), key=lambda r: r["rank"]):
                print(f"  rank {r.pop('rank')}: " + ", ".join(f"{k} {v - t0:.1f}" for k, v in r.items()))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
