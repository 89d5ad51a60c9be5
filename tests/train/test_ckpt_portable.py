"""Checkpoints under real DeepSpeed on Ray Train workers: the projector-only format holds no pickle, resumes on
another number of workers as if the run had never stopped, and any format refuses a damaged file before loading.
Also the balanced split of a corpus over ranks, directly and through the SFT pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from r1v.core.config import TrainerConfig

VOCAB, DIM, ROWS, LEN, STEPS = 16, 8, 4, 8, 6


class TinyLM(torch.nn.Module):
    """Frozen embedding and head around a trainable middle layer (the projector's place)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.out = torch.nn.Linear(DIM, VOCAB)
        self.emb.requires_grad_(False)
        self.out.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(self.emb(ids))))


def ckpt_loop(cfg: dict) -> None:
    """Train steps `start + 1 .. cfg["stop"]`, each on the same global batch of ROWS rows, split over the ranks
    and weighted so that the gradient is the global mean whatever the world size; checkpoint every step."""
    from r1v.core.config import OptimConfig
    from r1v.data.pipeline import balanced_shard
    from r1v.train import checkpoint
    from r1v.train.engine import init_engine, named_tensors
    from r1v.train.launch import setup_worker
    from r1v.train.sft import token_nll

    trainer = TrainerConfig.model_validate(cfg["trainer"])
    rank, world = setup_worker(trainer)
    torch.manual_seed(0)
    engine = init_engine(TinyLM(), trainer, OptimConfig(lr=0.05, grad_clip=0.0, warmup_ratio=0.5), STEPS, 2)
    real_load = torch.load

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called while resuming")

    torch.load = refuse  # resuming must not unpickle anything
    try:
        restored = checkpoint.restore(engine, rank, portable=cfg["portable"])
    finally:
        torch.load = real_load
    start = restored.state["step"] if restored else 0
    if restored and rank == 0:
        assert restored.arrays["seen"].tolist() == list(range(start))
    for step in range(start + 1, cfg["stop"] + 1):
        ids = torch.randint(0, VOCAB, (ROWS, LEN), generator=torch.Generator().manual_seed(step))
        mine = ids[torch.as_tensor(balanced_shard(np.arange(ROWS), world, rank))]
        nll, _ = token_nll(engine(mine), mine)
        engine.backward(nll / (ROWS * (LEN - 1)) * world)
        engine.step()
        checkpoint.save(engine, step, {"step": step}, {}, rank, portable=cfg["portable"],
                        arrays={"seen": np.arange(step)})
    params = named_tensors(engine.module, only_trainable=True, rank=rank)
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"params": {k: v.tolist() for k, v in params.items()},
                                                "lr": engine.get_lr()[0], "global_steps": engine.global_steps}))


def run(tmp_path: Path, storage: str, workers: int, stop: int, portable: bool = True, zero: int = 3) -> dict:
    from r1v.train.launch import fit

    trainer = TrainerConfig(num_workers=workers, zero_stage=zero)
    out = tmp_path / f"out-{storage}-{stop}.json"
    fit(ckpt_loop, {"trainer": trainer.model_dump(), "stop": stop, "portable": portable, "out": str(out)},
        trainer, tmp_path / storage, keep_checkpoints=2)
    return json.loads(out.read_text())


def latest(tmp_path: Path, storage: str) -> Path:
    return sorted((tmp_path / storage / "train").glob("step-*"))[-1]


@pytest.fixture()
def pickled_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/


@pytest.mark.slow
@pytest.mark.parametrize("zero", [3, 0])
def test_resume_on_other_worker_counts_continues_the_run(ray_cluster, tmp_path, pickled_by_value, zero):
    ref = run(tmp_path, "ref", 2, STEPS, zero=zero)
    run(tmp_path, "r", 2, 2, zero=zero)
    files = [p for p in latest(tmp_path, "r").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["arrays.safetensors", "sha256-rank-0.txt", "sha256-rank-1.txt",
                                             "state.json", "trainable.safetensors"]
    for p in files:  # no pickle (protocol 2+ starts with 0x80) and no torch.save zip
        assert not p.read_bytes().startswith((b"\x80", b"PK\x03\x04")), p
    state = json.loads((latest(tmp_path, "r") / "state.json").read_text())
    assert state["optimizer"]["step"] == 2 and state["optimizer"]["state_keys"] == ["exp_avg", "exp_avg_sq"]
    run(tmp_path, "r", 1, 4, zero=zero)  # 2 -> 1 worker
    got = run(tmp_path, "r", 2, STEPS, zero=zero)  # 1 -> 2 workers
    assert got["global_steps"] == ref["global_steps"] == STEPS
    assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
    for name, value in ref["params"].items():  # fp32 masters, Adam moments and step count all came back
        np.testing.assert_allclose(got["params"][name], value, rtol=0, atol=1e-6, err_msg=name)
    at_two = json.loads((tmp_path / "out-r-2.json").read_text())["params"]
    moved = {n: np.abs(np.asarray(v) - np.asarray(at_two[n])).max() for n, v in ref["params"].items()}
    assert min(moved.values()) > 1e-4  # the steps after the resume did train


@pytest.mark.slow
@pytest.mark.parametrize("portable, target", [(True, "trainable.safetensors"),
                                              (False, "ds/mp_rank_00_model_states.pt")])
def test_a_flipped_byte_is_refused_before_loading(ray_cluster, tmp_path, pickled_by_value, portable, target):
    run(tmp_path, "s", 1, 2, portable=portable)
    ckpt = latest(tmp_path, "s")
    sums = (ckpt / "sha256-rank-0.txt").read_text()
    assert target in sums and "state.json" in sums
    path = ckpt / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError) as err:
        run(tmp_path, "s", 1, 4, portable=portable)
    msg = str(err.value)
    # refused by the check (the torch.load tripwire never fired: DeepSpeed's loader was not reached)
    assert f"{path}: sha256 mismatch" in msg and "torch.load called" not in msg, msg[-2000:]


def test_balanced_shard_is_within_one_row():
    from r1v.data.pipeline import balanced_shard

    for n, world in [(61, 2), (300, 2), (41, 2), (7, 3), (1, 2), (0, 2), (1000, 7)]:
        rows = np.random.default_rng(n).permutation(n)
        parts = [balanced_shard(rows, world, r) for r in range(world)]
        assert np.array_equal(np.concatenate(parts), rows)  # nothing dropped or repeated, order kept
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(balanced_shard(np.arange(61), 2, r)) for r in range(2)] == [31, 30]
    assert [len(balanced_shard(np.arange(300), 2, r)) for r in range(2)] == [150, 150]


def test_rank_datasets_read_only_their_rows(ray_cluster, tiny_assets, tmp_path):
    """Through the real pipeline: each rank's dataset holds exactly its share (61 and 300 rows, shuffled order,
    two files), and a rank's dataset decodes only its rows."""
    import pyarrow.parquet as pq

    from r1v.core.config import PreprocessConfig
    from r1v.data.pipeline import balanced_shard, epoch_order, preprocessed_dataset

    base = pq.read_table(tiny_assets["train"])
    for n in (61, 300):
        corpus = tmp_path / f"c{n}"
        corpus.mkdir()
        rows = base.take([i % base.num_rows for i in range(n)])
        pq.write_table(rows.slice(0, n // 3), corpus / "part-00000.parquet", row_group_size=8)
        pq.write_table(rows.slice(n // 3), corpus / "part-00001.parquet", row_group_size=8)
        order = epoch_order(str(corpus), [0, 1])
        assert sorted(order.tolist()) == list(range(n)) and order.tolist() != list(range(n))
        got = []
        for rank in range(2):
            mine = balanced_shard(order, 2, rank)
            ds = preprocessed_dataset(str(corpus), tiny_assets["model"], PreprocessConfig(), seed=[0, 1], rows=mine)
            got.append([r["row"] for r in ds.iter_rows()])
            assert got[-1] == mine.tolist()  # its rows, in the epoch's order
        assert [len(g) for g in got] == [(n + 1) // 2, n // 2]
