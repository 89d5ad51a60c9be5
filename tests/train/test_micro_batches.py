"""How the SFT loop cuts a rank's shard into micro-steps, with and without packing and shuffling, and weighs
tokens under gradient accumulation (resume is by global row: tests/train/test_ckpt_portable.py and
tests/train/test_sft_resume.py)."""

from __future__ import annotations

import pytest
import torch

from r1v.train.config import SFTConfig
from r1v.train.sft import micro_batches, window_loss


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        bad = i % 7 == 3
        rows.append({"id": f"r{i}", "input_ids": [] if bad else [1] * (5 + (i * 13) % 40), "labels": [],
                     "pixel_values": b"", "n_tiles": 0, "error": "image_decode" if bad else "", "detail": "",
                     "source": "t", "answer": ""})
    return rows


def run_epoch(ds, c: SFTConfig, key) -> list[list[str]]:
    return [[r["id"] for r in g] for g in micro_batches(ds.iterator(), c, key)]


@pytest.mark.parametrize("key", [None, (7, 1, 0, 0)], ids=["stream-order", "shuffled"])
@pytest.mark.parametrize("packing", [False, True])
def test_every_row_once_and_replayable(ray_cluster, packing, key):
    import ray.data

    rows = make_rows(50)
    c = SFTConfig(model="m", corpus="c", batch_size=2, packing=packing, max_tokens=64, pack_buffer=12)
    ds = ray.data.from_items(rows)

    groups = run_epoch(ds, c, key)
    seen = [i for g in groups for i in g]
    assert sorted(seen) == sorted(r["id"] for r in rows)  # every row exactly once, bad rows included
    if key is None and not packing:
        assert seen == [r["id"] for r in rows]  # stream order, as before shuffling existed
    if packing:
        by_id = {r["id"]: r for r in rows}
        for g in groups:  # a micro-step holds at most batch_size sequences of <= max_tokens each
            assert sum(len(by_id[i]["input_ids"]) for i in g) <= 2 * 64

    assert run_epoch(ds, c, key) == groups  # the same stream, the same micro-steps


@pytest.mark.parametrize("packing", [False, True])
def test_window_shuffle_is_seeded_per_epoch_rank_and_segment(ray_cluster, packing):
    import ray.data

    rows = make_rows(60)
    c = SFTConfig(model="m", corpus="c", batch_size=2, packing=packing, max_tokens=64, pack_buffer=20)
    ds = ray.data.from_items(rows)
    order = {key: [i for g in run_epoch(ds, c, key) for i in g]
             for key in [(0, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (1, 0, 0, 0), (0, 0, 0, 1)]}
    assert [i for g in run_epoch(ds, c, (0, 0, 0, 0)) for i in g] == order[(0, 0, 0, 0)]  # same seed: same order
    assert len(set(map(tuple, order.values()))) == len(order)  # another epoch, rank or seed: another order
    stream = [r["id"] for r in rows]
    for seq in order.values():
        assert sorted(seq) == sorted(stream)
        if not packing:  # rows move within their window of pack_buffer rows only
            assert all(sorted(seq[k : k + 20]) == sorted(stream[k : k + 20]) for k in range(0, 60, 20))
            assert seq != stream


def simulated_step_grad(micro: list[list[tuple[torch.Tensor, torch.Tensor]]], weight: torch.Tensor) -> torch.Tensor:
    """The gradient DeepSpeed forms from `window_loss` on every micro-batch: summed over a rank's micro-batches
    (backward_window passes scale_wrt_gas=False), averaged over ranks. micro[rank] = [(x, y), ...]."""
    world = len(micro)
    tokens = sum(len(y) for per_rank in micro for _, y in per_rank)
    grads = []
    for per_rank in micro:
        w = weight.clone().requires_grad_(True)
        for x, y in per_rank:
            nll = torch.nn.functional.cross_entropy(x @ w, y, reduction="sum")
            window_loss(nll, tokens, world).backward()
        grads.append(w.grad)
    return torch.stack(grads).mean(0)


def test_window_loss_gives_the_full_batch_token_mean_gradient():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=gen)
    # Two ranks, three micro-batches each, of very different token counts (1 to 40 tokens).
    sizes = [[1, 40, 3], [17, 2, 9]]
    micro = [[(torch.randn(n, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)) for n in per_rank]
             for per_rank in sizes]
    w = weight.clone().requires_grad_(True)
    x = torch.cat([x for per_rank in micro for x, _ in per_rank])
    y = torch.cat([y for per_rank in micro for _, y in per_rank])
    torch.nn.functional.cross_entropy(x @ w, y).backward()  # every token of the window weighs the same
    assert torch.allclose(simulated_step_grad(micro, weight), w.grad, atol=1e-6)

    # What the loop did before: a mean per micro-batch, averaged. It weighs the 1-token micro-batch 40x more.
    per_micro = []
    for per_rank in micro:
        for xm, ym in per_rank:
            wm = weight.clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(xm @ wm, ym).backward()
            per_micro.append(wm.grad)
    assert not torch.allclose(torch.stack(per_micro).mean(0), w.grad, atol=1e-3)
