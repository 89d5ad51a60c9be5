"""Non-finite optimizer steps under real DeepSpeed in real Ray Train workers: a step whose loss or gradient norm is
NaN/inf is skipped (parameters, optimizer state and learning rate untouched, at every ZeRO stage), and a stage that
skips more than `trainer.max_nonfinite_steps` fails naming the step, with its checkpoints finite.

The SFT runs get their NaN for real, from the data: the model's (frozen) embedding of `~` is NaN and one corpus row,
the third a worker trains on, contains `~`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from r1v.core.config import TrainerConfig

VOCAB, DIM = 16, 8
POISON = "~"  # a byte no synthetic text contains: one token of its own in the tiny byte-level BPE


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.out = torch.nn.Linear(DIM, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(input_ids)))


def window(w: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * w + rank)
    return [torch.randint(0, VOCAB, (2, 6), generator=gen) for _ in range(2)]


def optimizer_state(engine) -> list[dict[str, torch.Tensor]]:
    """A copy of the torch optimizer's per-tensor state (under ZeRO, of this rank's fp32 partitions)."""
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for st in engine.basic_optimizer.state.values()]


def same_state(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]),
                                                                              torch.as_tensor(y[k])) for k in x)
                                    for x, y in zip(a, b, strict=True))


def run_windows(trainer: TrainerConfig, windows: list[int], rank: int, world: int, poisoned: int | None = None
                ) -> dict:
    """Windows of two micro-batches on a fresh engine; window `poisoned` has a NaN loss on rank 1 only."""
    from r1v.core.config import OptimConfig
    from r1v.train.engine import guarded_step, init_engine, named_tensors
    from r1v.train.sft import backward_window, token_nll

    # weight decay, clipping and a decaying LR: a skipped step that still moved any of them would show
    optim = OptimConfig(lr=0.05, weight_decay=0.1, grad_clip=1.0, warmup_ratio=0.0, min_lr_ratio=0.1)
    torch.manual_seed(0)
    engine = init_engine(TinyLM(), trainer, optim, 4, 2, 2)
    rec: dict = {"steps": []}
    for w in windows:
        def nll(ids: torch.Tensor, w: int = w) -> torch.Tensor:
            loss = token_nll(engine(ids), ids)[0]
            return loss * float("nan") if (w == poisoned and rank == 1) else loss

        before = named_tensors(engine.module, only_trainable=True, rank=rank)
        opt_before, lr_before = optimizer_state(engine), engine.get_lr()[0]
        g_nll, g_tok = backward_window(engine, window(w, rank), nll, [10, 10], world)
        out = guarded_step(engine, g_nll / g_tok)
        after = named_tensors(engine.module, only_trainable=True, rank=rank)
        rec["steps"].append({
            "nonfinite": out.nonfinite, "grad_norm": out.grad_norm,
            "ds_grad_norm": None if out.skipped or engine.get_global_grad_norm() is None
            else float(engine.get_global_grad_norm()),
            "params_unchanged": rank != 0 or all(torch.equal(before[k], after[k]) for k in before),
            "params_finite": rank != 0 or all(bool(torch.isfinite(v).all()) for v in after.values()),
            "opt_unchanged": same_state(opt_before, optimizer_state(engine)),
            "lr_unchanged": engine.get_lr()[0] == lr_before})
    rec["final"] = {k: v.tolist() for k, v in named_tensors(engine.module, True, rank).items()}
    return rec


def skip_loop(cfg: dict) -> None:
    """Per ZeRO stage: windows 0, 1 (NaN), 2 on one engine and windows 0, 2 on a fresh one."""
    from r1v.train.launch import setup_worker

    rank, world = setup_worker(TrainerConfig.model_validate(cfg["trainer"]))
    results: dict[int, dict] = {}
    for stage in (0, 1, 2, 3):
        trainer = TrainerConfig.model_validate({**cfg["trainer"], "zero_stage": stage})
        results[stage] = {"skipped": run_windows(trainer, [0, 1, 2], rank, world, poisoned=1),
                          "reference": run_windows(trainer, [0, 2], rank, world)}
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps(results))


@pytest.mark.slow
def test_a_nonfinite_step_changes_nothing_at_any_zero_stage(ray_cluster, tmp_path):
    import ray.cloudpickle

    from r1v.train.launch import fit

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    trainer = TrainerConfig(num_workers=2)
    out = tmp_path / "out.json"
    fit(skip_loop, {"trainer": trainer.model_dump(), "out": str(out)}, trainer, tmp_path / "ray", 1)
    for stage, res in json.loads(out.read_text()).items():
        first, bad, last = res["skipped"]["steps"]
        assert first["nonfinite"] is None and last["nonfinite"] is None, stage
        assert not first["params_unchanged"] and not last["params_unchanged"], stage  # real steps move
        for s in (first, last):  # the norm checked before the step is DeepSpeed's own pre-clipping norm
            if stage != "0":  # ZeRO-0 in fp32 clips without recording it
                assert math.isclose(s["grad_norm"], s["ds_grad_norm"], rel_tol=1e-5), (stage, s)
        # rank 1's NaN loss makes every rank skip, and the skipped step moves nothing
        assert bad["nonfinite"] == "loss and grad norm", (stage, bad)
        assert bad["params_unchanged"] and bad["opt_unchanged"] and bad["lr_unchanged"], (stage, bad)
        assert last["params_finite"], stage
        # nothing of the NaN window lingers: the next step is exactly the one a run without it takes
        for name, ref in res["reference"]["final"].items():
            got = torch.tensor(res["skipped"]["final"][name])
            assert torch.allclose(got, torch.tensor(ref), atol=1e-6, rtol=0), (stage, name)


# --------------------------------------------------------------------------- SFT stages, NaN from the data


@pytest.fixture(scope="module")
def poisoned(tiny_assets, tmp_path_factory):
    """The tiny VLM with a NaN embedding for `~`, and a corpus of 4 rows whose third (index 2) ends with `~`."""
    import pyarrow.parquet as pq

    from r1v.data.schema import write_corpus
    from r1v.data.synthetic import generate
    from r1v.model.io import load_model, save_model

    root = tmp_path_factory.mktemp("poisoned")
    model, tok = load_model(tiny_assets["model"])
    token = tok.convert_tokens_to_ids(POISON)
    assert tok(f"x {POISON}")["input_ids"][-1] == token
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    rows = pq.read_table(generate(root / "data", n_train=4, n_test=1, seed=3)["train"]).to_pylist()
    assert not any(POISON in m["content"] for r in rows for m in r["messages"])
    rows[2]["messages"][1]["content"] += f" {POISON}"
    return {"model": str(save_model(model, tok, root / "vlm")), "corpus": str(write_corpus(rows, root / "corpus"))}


def sft_config(poisoned: dict, max_nonfinite: int):
    from r1v.train.config import SFTConfig

    # One worker: the third row is then the third step's (with two, Ray's split decides which rank reads it).
    return SFTConfig(model=poisoned["model"], corpus=poisoned["corpus"], batch_size=1, shuffle=False,
                     checkpoint_every=1, keep_checkpoints=10, optim={"lr": 1e-2, "warmup_ratio": 0.0},
                     trainer={"num_workers": 1, "max_nonfinite_steps": max_nonfinite})


def projector(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights in r1v's portable checkpoint (no pickle: safetensors)."""
    from safetensors.torch import load_file

    tensors = load_file(ckpt / "trainable.safetensors")
    state = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    assert state and all("multi_modal_projector" in k for k in state), list(state)
    return state


@pytest.mark.slow
def test_nan_at_step_3_fails_sft_and_the_latest_checkpoint_is_finite(ray_cluster, poisoned, tmp_path):
    from r1v.train.sft import train_sft

    # Ray Train raises its own error type; the worker's message says what happened
    with pytest.raises(Exception, match=r"sft step 3: non-finite loss and grad norm \(loss nan") as err:
        train_sft(sft_config(poisoned, 0), tmp_path / "sft", None, None)
    assert "max_nonfinite_steps = 0" in str(err.value)
    ckpts = sorted(p.name for p in (tmp_path / "sft" / "ray" / "train").glob("step-*"))
    assert ckpts == ["step-000001", "step-000002"]  # nothing saved at or after the NaN step
    assert not (tmp_path / "sft" / "model").exists()
    state = projector(tmp_path / "sft" / "ray" / "train" / "step-000002")
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


@pytest.mark.slow
def test_one_nan_step_is_skipped_and_sft_finishes(ray_cluster, poisoned, tmp_path):
    from mlflow.tracking import MlflowClient

    from r1v.train.sft import train_sft
    from r1v.workflow import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start_run(uri, tracking.ensure_experiment(uri, "divergence"), "sft")
    train_sft(sft_config(poisoned, 1), tmp_path / "sft", uri, run)
    assert (tmp_path / "sft" / "model").exists()
    ckpt = tmp_path / "sft" / "ray" / "train"
    w = {s: projector(ckpt / f"step-00000{s}") for s in (2, 3, 4)}
    for k in w[2]:
        assert torch.equal(w[2][k], w[3][k]), k  # step 3 (the NaN row) was skipped
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])  # and training went on
    assert all(bool(torch.isfinite(v).all()) for v in w[4].values())
    client = MlflowClient(uri)
    skipped = {m.step: m.value for m in client.get_metric_history(run, "nonfinite_steps")}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1}, skipped
    norms = {m.step: m.value for m in client.get_metric_history(run, "grad_norm")}
    assert math.isnan(norms[3]) and all(math.isfinite(v) and v > 0 for s, v in norms.items() if s != 3), norms
