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

    # no restarts: a worker's error here is the test's subject, and a restarted group would only repeat it
    trainer = TrainerConfig(num_workers=workers, zero_stage=zero, max_failures=0)
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


def flip_a_byte_and_resume(tmp_path: Path, storage: str, target: str, workers: int, stop: int,
                           portable: bool = True) -> None:
    """Flip one byte of `target` in the latest checkpoint and resume: refused by its sha256 check, before any
    loader reads the file (the torch.load tripwire never fires: DeepSpeed's loader is not reached)."""
    ckpt = latest(tmp_path, storage)
    (path,) = ckpt.glob(target)
    sums = (ckpt / "sha256-rank-0.txt").read_text()
    assert f"  {path.relative_to(ckpt)}\n" in sums and "  state.json\n" in sums
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as err:  # Ray Train's WorkerGroupError, carrying the worker's error
        run(tmp_path, storage, workers, stop, portable=portable)
    msg = str(err.value)
    assert f"{path}: sha256 mismatch" in msg and "torch.load called" not in msg, msg[-2000:]


@pytest.mark.slow
def test_resume_on_other_worker_counts_continues_the_run(ray_cluster, tmp_path, pickled_by_value):
    """One run stopped twice and resumed each time on another number of workers and ZeRO stage: 2 workers at ZeRO-3
    to step 2, 1 at ZeRO-0 (the miniature's stage) to step 4, 2 at ZeRO-3 to step 6: the same parameters, learning
    rate and step count as a run that never stopped. A portable checkpoint with a flipped byte is then refused."""
    ref = run(tmp_path, "ref", 2, STEPS, zero=3)
    storage = "chain"
    for workers, zero, stop in ((2, 3, 2), (1, 0, 4)):
        run(tmp_path, storage, workers, stop, zero=zero)
        files = [p for p in latest(tmp_path, storage).rglob("*") if p.is_file()]
        assert sorted(p.name for p in files) == ["arrays.safetensors",
                                                 *(f"sha256-rank-{r}.txt" for r in range(workers)),
                                                 "state.json", "trainable.safetensors"]
        for p in files:  # no pickle (protocol 2+ starts with 0x80) and no torch.save zip
            assert not p.read_bytes().startswith((b"\x80", b"PK\x03\x04")), p
        state = json.loads((latest(tmp_path, storage) / "state.json").read_text())
        assert state["optimizer"]["step"] == stop and state["optimizer"]["state_keys"] == ["exp_avg", "exp_avg_sq"]
    got = run(tmp_path, storage, 2, STEPS, zero=3)
    assert got["global_steps"] == ref["global_steps"] == STEPS
    assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
    for name, value in ref["params"].items():  # fp32 masters, Adam moments and step count all came back, twice
        np.testing.assert_allclose(got["params"][name], value, rtol=0, atol=1e-6, err_msg=name)
    for stop in (2, 4):
        before = json.loads((tmp_path / f"out-{storage}-{stop}.json").read_text())["params"]
        moved = {n: np.abs(np.asarray(v) - np.asarray(before[n])).max() for n, v in ref["params"].items()}
        assert min(moved.values()) > 1e-4, stop  # the steps after each resume did train
    # the check every rank runs before loading (`checkpoint.restore`), here in this process: a resume through Ray
    # Train that it refuses is the DeepSpeed-format test's
    from r1v.train.checkpoint import verify

    ckpt = latest(tmp_path, storage)
    path = ckpt / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"{path}: sha256 mismatch"):
        verify(ckpt, 0, 1)


@pytest.mark.slow
def test_a_flipped_byte_in_a_deepspeed_checkpoint_is_refused_before_loading(ray_cluster, tmp_path,
                                                                            pickled_by_value):
    run(tmp_path, "s", 1, 2, portable=False)
    flip_a_byte_and_resume(tmp_path, "s", "ds/*optim_states.pt", 1, 4, portable=False)


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


DRIVER = """
import json, sys
from pathlib import Path
from r1v.train.config import SFTConfig
from r1v.train.sft import train_sft
train_sft(SFTConfig.model_validate(json.loads(sys.argv[1])), Path(sys.argv[2]), None, None)
"""


@pytest.mark.slow
def test_sft_resumed_on_one_worker_trains_each_remaining_row_once(ray_cluster, tiny_assets, tmp_path):
    """Epoch 0 on two workers (29 rows: 15 and 14), killed in epoch 1, resumed on one worker in the same stage
    folder (the same Ray Train storage): every row of each epoch trained once, counts reconcile, and with
    `global_batch` the one worker takes steps of the same 4 rows (8 steps an epoch either way)."""
    import os
    import signal
    import subprocess
    import time

    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from r1v.data.synthetic import generate
    from r1v.train.config import SFTConfig
    from r1v.train.sft import train_sft

    data = generate(tmp_path / "data", n_train=29, n_test=2, seed=0, corrupt_rows=3)
    cfg = SFTConfig(model=tiny_assets["model"], corpus=str(data["train"]), batch_size=2, global_batch=4,
                    checkpoint_every=2, keep_checkpoints=10, epochs=2, pack_buffer=8, optim={"lr": 1e-3})
    stage = tmp_path / "sft"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    log = tmp_path / "first.log"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, cfg.model_dump_json(), str(stage)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    ckpts = stage / "ray" / "train"
    deadline = time.time() + 400
    # epoch 1 runs steps 9 to 16: killed after its first checkpoint, with six steps' margin before the epoch ends
    # (the workers train on while this process polls, and a loaded machine can delay the poll by seconds)
    while time.time() < deadline and not list(ckpts.glob("step-000010")):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    assert list(ckpts.glob("step-000010")), "no checkpoint appeared in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage / "epoch-1-counts.json").exists()

    out = train_sft(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"num_workers": 1})}), stage,
                    None, None)
    first = pq.read_table(stage / "epoch-0-rows.parquet").to_pydict()
    assert sorted(first["row"]) == list(range(29)) and set(first["segment"]) == {0}
    assert [first["rank"].count(r) for r in (0, 1)] == [15, 14]  # balanced: within one row
    second = pq.read_table(stage / "epoch-1-rows.parquet").to_pydict()
    assert sorted(second["row"]) == list(range(29))  # each row once: none repeated, none lost
    by_segment = {s: [r for r, g in zip(second["rank"], second["segment"], strict=True) if g == s]
                  for s in set(second["segment"])}
    assert set(by_segment) == {0, 1}
    assert set(by_segment[0]) == {0, 1} and set(by_segment[1]) == {0}  # two workers, then one
    assert 0 < len(by_segment[1]) < 29
    for epoch, cnt in enumerate(out["counts"]):
        assert cnt["epoch"] == epoch and cnt["rows_in"] == cnt["rows_distinct"] == 29
        assert cnt["rows_trained"] + cnt["rows_quarantined"] == 29 and cnt["rows_quarantined"] == 3
    end = json.loads((stage / "ray" / "train" / "epoch-001-end" / "state.json").read_text())
    assert end["step"] == 16 and end["state"]["epoch"] == 2
    projector = load_file(str(stage / "model" / "projector.safetensors"))
    assert projector and all(bool(torch.isfinite(v.float()).all()) for v in projector.values())  # bf16: torch


def test_global_batch_derives_grad_accum():
    from r1v.train.config import SFTConfig

    c = SFTConfig(model="m", corpus="c", batch_size=2, global_batch=8)
    assert [c.accumulation(w) for w in (1, 2, 4)] == [4, 2, 1]
    assert SFTConfig(model="m", corpus="c", grad_accum=3).accumulation(4) == 3  # None: per worker, as given
    with pytest.raises(ValueError, match=r"global_batch 8 is not a multiple of trainer.num_workers \(3\) x "
                                         r"batch_size \(2\) = 6"):
        c.accumulation(3)
    with pytest.raises(ValueError, match="global_batch or grad_accum, not both"):
        SFTConfig(model="m", corpus="c", global_batch=8, grad_accum=2)
