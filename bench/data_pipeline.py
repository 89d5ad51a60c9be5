"""Data pipeline throughput on MATH-Vision testmini at the real InternVL geometry, against PIL alone.

What it measures (each a median over --repeats runs, after a warm-up run):

- `pil_only`: one core decodes each image with PIL (`Image.open(...).convert("RGB")`, as InternVL's loader)
  and does the same bicubic resizes to the tile grid plus the thumbnail. No tiling into arrays, no
  normalisation, no tokenisation. This is the floor the full pipeline is compared with.
- `full_1core`: the same rows through `preprocess_batch` (decode, tile, tokenise; Arrow batches of 8 rows,
  uint8 tiles) and then what the trainer does with a batch: `table_rows` (zero-copy views) and
  `collate_packed` -- in one process.
- `normalise_cpu`: the uint8 -> float ImageNet normalisation of the same tiles. The pipeline ships uint8 tiles
  and the training step normalises them next to the model (on the accelerator in real training), so it is
  not part of `full_1core`; it is printed so that the CPU-only cost is visible too.
- `ray_cN`: the SFT stage's own pipeline, `r1v.data.pipeline.preprocessed_dataset` (row-group read tasks,
  `preprocess_batch` in Ray Data tasks, at most N at once) over the rows written as a corpus (repeated
  --ray-copies times), the driver iterating the batches and packing them as a training worker would. Ray
  start-up and a warm-up pass (which starts the workers and loads the tokenizer there) are excluded. The
  driver and Ray's own processes share the machine's cores with the workers, so the CPU time of every process
  is also counted: rows per CPU-second is the per-core rate whatever else runs on the machine.
- `pil_only_x2`: `pil_only` in two processes at once: whether the machine's two cores scale at all.

The ratio per core is (rows/s / workers) / pil_only rows/s, every measured run bracketed by pil_only runs
(ratio to their mean; median over the runs), since this shared machine drifts by +-10% over minutes. The CPU
ratios are rows per CPU-second / the median of the pil_only runs between the Ray runs, over every process
(driver, workers, Ray's own) or over the Ray workers alone (the preprocessing per core it used, whatever else
shares the cores). The target is >= 0.8.

Geometry: 448 px tiles, patch 14 (256 tokens per tile), --max-tiles 6 by default (InternVL uses 6 or 12);
the tiny random model only supplies the tokenizer and the config (its 56 px default would flatter us).

Padding: fraction of pad tokens with plain padded batches (rows in corpus order, `collate_sft`) vs packed
ones, on MATH-Vision and on the synthetic corpus (tiny 56 px geometry, as the tiny workflow uses it).

Run:  python bench/data_pipeline.py [--max-tiles 6] [--repeats 3] [--workers 1,2] [--no-ray]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

from r1v.data.pipeline import BATCH_ROWS as BATCH  # rows per preprocessing call, as the SFT pipeline uses

MATHV = Path("/work/shared/data/benchmarks/mathv")


def mathv_corpus(root: Path = MATHV) -> pa.Table:
    """Corpus rows: `<image>\\n` + question (+ options), a short `<think>` chain and the boxed answer."""
    from r1v.data.schema import CORPUS_SCHEMA, make_row

    rows = []
    for line in (root / "testmini.jsonl").read_text().splitlines():
        rec = json.loads(line)
        question = re.sub(r"<image\d*>", "", rec["question"]).strip()
        if rec.get("options"):
            question += "\nOptions: " + ", ".join(rec["options"])
        answer = str(rec["answer"])
        reasoning = f"<think>\nReading the figure and the question, the result is {answer}.\n</think>\n"
        messages = [
            {"role": "user", "content": f"<image>\n{question}"},
            {"role": "assistant", "content": reasoning + f"Answer: \\boxed{{{answer}}}"},
        ]
        image = (root / rec["image"]).read_bytes()
        rows.append(make_row(f"mathv-{rec['id']}", messages, [image], answer, "mathv"))
    return pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA)


def save_tiny(tile_size: int, path: Path) -> str:
    """A tiny random VLM: its config gives the geometry (tile, patch 14), and it brings a tokenizer."""
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    model, tok = build_tiny_vlm(TinySpec(tile_size=tile_size, patch_size=14))
    save_model(model, tok, path)
    return str(path)


def timed(fn: Callable[[], int], repeats: int, warmup: bool = True) -> tuple[float, list[float]]:
    """Median rows/s of `fn` (which returns the rows it processed) over `repeats` runs after one warm-up."""
    if warmup:
        fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), rates


class Paired(NamedTuple):
    rate: float  # median rows/s of fn
    ratio: float  # median over fn's runs of fn / (mean of the base runs just before and after it)
    rates: list[float]
    ratios: list[float]
    base: float  # median rows/s of the base runs


def paired(fn: Callable[[], int], base: Callable[[], int], repeats: int, warmup: bool = True) -> Paired:
    """`fn` between runs of the baseline `base`: base, fn, base, fn, ..., base. Why: this machine's speed
    drifts by +-10% over minutes (a shared VM), so a ratio of two rates measured minutes apart is mostly that
    drift; bracketing each run cancels a drift that is linear over it."""
    def rate(f: Callable[[], int]) -> float:
        t0 = time.perf_counter()
        n = f()
        return n / (time.perf_counter() - t0)

    if warmup:
        base()
        fn()
    bases, rates = [rate(base)], []
    for _ in range(repeats):
        rates.append(rate(fn))
        bases.append(rate(base))
    ratios = [r / ((lo + hi) / 2) for r, lo, hi in zip(rates, bases, bases[1:], strict=False)]
    return Paired(statistics.median(rates), statistics.median(ratios), rates, ratios, statistics.median(bases))


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) so far of this process, of the Ray worker processes that run data tasks, and of
    Ray's other processes (raylet, GCS, agents, its own actors): `ray.init` starts them all as descendants of
    this one."""
    import psutil

    out = {"driver": 0.0, "ray workers": 0.0, "ray daemons": 0.0}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            cmd = " ".join(proc.cmdline())
        except psutil.Error:  # exited meanwhile
            continue
        # Data tasks run in `ray::IDLE` / `ray::ReadRowGroupSource...` processes; Ray's own actors
        # (`ray::_StatsActor`, `ray::DashboardAgent`, ...) are daemons here.
        task = cmd.startswith("ray::") and not cmd[5:].startswith(("_", "DashboardAgent", "RuntimeEnvAgent"))
        group = "driver" if proc.pid == me.pid else "ray workers" if task else "ray daemons"
        out[group] += t.user + t.system + t.children_user + t.children_system
    return out


def pil_only(images: list[bytes], tile: int, max_tiles: int) -> int:
    """Decode + the same bicubic resizes as the tiler, nothing else."""
    from PIL import Image

    from r1v.model.tiling import choose_grid

    for data in images:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        cols, rows = choose_grid(im.width, im.height, tile, 1, max_tiles)
        im.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
        if cols * rows > 1:
            im.resize((tile, tile), Image.Resampling.BICUBIC)
    return len(images)


def _pil_rate(args: tuple[list[bytes], int, int, int]) -> float:
    images, tile, max_tiles, repeats = args
    return timed(lambda: pil_only(images, tile, max_tiles), repeats)[0]


def pil_parallel(images: list[bytes], tile: int, max_tiles: int, repeats: int, procs: int = 2) -> list[float]:
    """`pil_only` rows/s of each of `procs` processes running at the same time."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(procs) as pool:
        return pool.map(_pil_rate, [(images, tile, max_tiles, repeats)] * procs)


def pack_table(table: pa.Table, pad_id: int, tile: int, max_tokens: int) -> int:
    """What the trainer does with a preprocessed batch: rows to dicts, drop error rows, pack."""
    from r1v.data.collate import table_rows
    from r1v.data.packing import collate_packed

    rows = [r for r in table_rows(table) if not r["error"]]
    if rows:
        collate_packed(rows, pad_id, tile, max_tokens)
    return table.num_rows


def rows_only(table: pa.Table, model_dir: str, pre: dict[str, Any]) -> int:
    """Diagnostic: `preprocess_row` alone (decode, tile, normalise, tokenise); no Arrow, no packing."""
    from r1v.core.config import PreprocessConfig
    from r1v.data.pipeline import preprocess_row

    cfg = PreprocessConfig.model_validate(pre)
    for row in table.to_pylist():
        preprocess_row(row, model_dir, cfg)
    return table.num_rows


def batches_only(table: pa.Table, model_dir: str, pre: dict[str, Any]) -> int:
    """Diagnostic: `preprocess_batch` (rows + the Arrow output table), no packing."""
    from r1v.data.pipeline import preprocess_batch

    for lo in range(0, table.num_rows, BATCH):
        preprocess_batch(table.slice(lo, BATCH), model_dir, pre)
    return table.num_rows


def full_one_core(table: pa.Table, model_dir: str, pre: dict[str, Any], pad_id: int, tile: int,
                  max_tokens: int) -> int:
    from r1v.data.pipeline import preprocess_batch

    for lo in range(0, table.num_rows, BATCH):
        pack_table(preprocess_batch(table.slice(lo, BATCH), model_dir, pre), pad_id, tile, max_tokens)
    return table.num_rows


def ray_run(corpus: Path, model_dir: str, pre: dict[str, Any], concurrency: int, pad_id: int, tile: int,
            max_tokens: int, rows: int) -> int:
    """The SFT stage's pipeline (`preprocessed_dataset`: row-group read tasks fused with `preprocess_batch`),
    at most `concurrency` tasks at once; the driver iterates and packs, as a training worker would."""
    from r1v.core.config import PreprocessConfig
    from r1v.data.pipeline import preprocessed_dataset

    ds = preprocessed_dataset(str(corpus), model_dir, PreprocessConfig.model_validate(pre), concurrency=concurrency)
    n = 0
    for batch in ds.iter_batches(batch_size=BATCH, batch_format="pyarrow"):
        n += pack_table(batch, pad_id, tile, max_tokens)
    if n != rows:
        raise RuntimeError(f"Ray Data returned {n} rows for {rows}")
    return n


def padding_report(name: str, lengths: list[int], batch_rows: int, max_tokens: int) -> dict[str, float]:
    """Pad fraction: padded batches of `batch_rows` (corpus order) vs packing with a `max_tokens` budget."""
    from r1v.data.packing import padding_fraction, token_budget_batches

    batches = [list(range(i, min(i + batch_rows, len(lengths)))) for i in range(0, len(lengths), batch_rows)]
    bins = token_budget_batches(lengths, max_tokens)
    # per micro-batch, as the SFT loop would pack: the same batches, each packed and padded to its longest bin
    real = slots = 0
    for b in batches:
        sub = [lengths[i] for i in b]
        sub_bins = token_budget_batches(sub, max_tokens)
        real += sum(sub)
        slots += len(sub_bins) * max(sum(sub[i] for i in g) for g in sub_bins)
    out = {
        "padded": padding_fraction(lengths, batches, "padded"),
        "packed_corpus_to_budget": padding_fraction(lengths, bins, "packed", pad_to=max(max_tokens,
                                                                                          max(lengths))),
        "packed_per_microbatch": 1 - real / slots,
    }
    print(f"[padding] {name}: {len(lengths)} rows, length min/median/max {min(lengths)}/"
          f"{int(statistics.median(lengths))}/{max(lengths)}; batches of {batch_rows}, budget {max_tokens}: "
          + ", ".join(f"{k} {v:.1%}" for k, v in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="Ray Data concurrencies to measure, comma separated")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--row-group-rows", type=int, default=16, help="row group size of the corpus Ray reads")
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--ray-copies", type=int, default=2, help="the corpus repeated this many times for the Ray "
                                                              "runs (longer runs: less start-up and tail)")
    ap.add_argument("--batch-rows", type=int, default=8, help="rows per SFT micro-batch (padding)")
    ap.add_argument("--budget-mathv", type=int, default=4096, help="packing budget for the padding report")
    ap.add_argument("--budget-synthetic", type=int, default=512)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    from r1v.core.config import PreprocessConfig
    from r1v.data.pipeline import load_tokenizer, preprocess_batch, vision_geometry

    work = Path(tempfile.mkdtemp(prefix="r1v-bench-"))
    model_dir = save_tiny(448, work / "tiny448")
    tile, per_tile = vision_geometry(model_dir)
    pad_id = int(load_tokenizer(model_dir).pad_token_id)
    pre = PreprocessConfig(max_tiles=args.max_tiles, max_length=16384).model_dump()
    max_tokens = 16384
    table = mathv_corpus()
    images = [r[0] for r in table.column("images").to_pylist()]
    print(f"[setup] {table.num_rows} MATH-Vision rows; tile {tile}px, {per_tile} tokens/tile, "
          f"max_tiles {args.max_tiles}; pack budget {max_tokens} tokens; {os.cpu_count()} CPUs; "
          f"median of {args.repeats} after a warm-up")

    res: dict[str, Any] = {"max_tiles": args.max_tiles, "rows": table.num_rows}
    pil, pil_all = timed(lambda: pil_only(images, tile, args.max_tiles), args.repeats)
    res["pil_only"] = pil
    print(f"[rate] {'pil_only (1 core):':33s} {pil:7.1f} rows/s  runs {[round(r, 1) for r in pil_all]}")
    par = pil_parallel(images, tile, args.max_tiles, args.repeats)
    res["pil_only_x2"] = par
    print(f"[rate] {'pil_only, 2 processes at once:':33s} {sum(par):7.1f} rows/s in all, "
          f"{[round(r, 1) for r in par]} each")
    base = functools.partial(pil_only, images, tile, args.max_tiles)

    def report(name: str, fn: Callable[[], int], per: int = 1) -> float:
        """Print fn's rows/s and its ratio to pil_only run alternately with it (per core: divided by `per`)."""
        rate, ratio, runs, ratios, _ = paired(fn, base, args.repeats)
        res[name] = rate
        res[name + " ratio"] = ratio / per
        print(f"[rate] {name + ':':33s} {rate:7.1f} rows/s  runs {[round(r, 1) for r in runs]}"
              f"  ratio per core {ratio / per:.2f} (pairs {[round(r / per, 2) for r in ratios]})")
        return rate

    report("preprocess_row only (1 core)", lambda: rows_only(table, model_dir, pre))
    report("preprocess_batch, no packing (1 core)", lambda: batches_only(table, model_dir, pre))
    full = report("full incl. packing (1 core)",
                  lambda: full_one_core(table, model_dir, pre, pad_id, tile, max_tokens))

    import torch

    from r1v.model.forward import normalize_pixels

    done = preprocess_batch(table, model_dir, pre)
    tiles = [torch.frombuffer(bytearray(b), dtype=torch.uint8).view(-1, 3, tile, tile)
             for b, e in zip(done.column("pixel_values").to_pylist(), done.column("error").to_pylist(), strict=True)
             if not e]

    def normalise_all() -> int:
        for t in tiles:
            normalize_pixels(t)
        return len(tiles)

    norm, runs = timed(normalise_all, args.repeats)
    res["normalise_cpu"] = norm
    both = 1 / (1 / full + 1 / norm)
    print(f"[rate] {'normalise on CPU (1 core):':33s} {norm:7.1f} rows/s  runs {[round(r, 1) for r in runs]}"
          f"  (full + CPU normalise: {both:.1f} rows/s, ratio/core {both / pil:.2f})")

    if not args.no_ray:
        import ray

        os.environ.setdefault("RAY_TMPDIR", str(work / "ray"))
        t0 = time.perf_counter()
        # A 1 GiB object store, which the warm-up pass fills and frees: the steady state of a long run, where
        # Ray reuses shared-memory pages already mapped. A short run through a fresh (default ~7 GiB) store
        # pays a page fault per 4 KiB written instead (measured: 16 ms vs 4 ms per 29 MB block put).
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store_mb << 20)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"[setup] ray.init {time.perf_counter() - t0:.1f} s (excluded)")
        from r1v.data.schema import write_corpus

        n_rows = table.num_rows * args.ray_copies
        corpus = write_corpus(table.to_pylist() * args.ray_copies, work / "mathv-corpus",
                              row_group_rows=args.row_group_rows)
        for k in [int(x) for x in args.workers.split(",")]:
            run = functools.partial(ray_run, corpus, model_dir, pre, k, pad_id, tile, max_tokens, n_rows)
            run()  # warm-up
            used: dict[str, float] = {}  # CPU seconds of each process group, over the Ray runs only

            def counted(run: Callable[[], int] = run, used: dict[str, float] = used) -> int:
                before = cpu_seconds()
                n = run()
                after = cpu_seconds()
                for g in after:
                    used[g] = used.get(g, 0.0) + after[g] - before[g]
                return n

            rate, ratio, rates, ratios, pil_here = paired(counted, base, args.repeats, warmup=False)
            ratio, ratios = ratio / k, [r / k for r in ratios]
            per_cpu_s = n_rows * args.repeats / sum(used.values())
            res[f"ray_c{k}"], res[f"ray_c{k} ratio"] = rate, ratio
            res[f"ray_c{k}_rows_per_cpu_s"] = per_cpu_s
            # the preprocessing alone, per core it used: rows per CPU-second of the Ray workers
            per_worker_cpu_s = n_rows * args.repeats / used["ray workers"]
            res[f"ray_c{k}_rows_per_worker_cpu_s"] = per_worker_cpu_s
            label = f"Ray Data, {k} worker(s):"
            print(f"[rate] {label:33s} {rate:7.1f} rows/s  runs {[round(r, 1) for r in rates]}"
                  f"  ratio per worker {ratio:.2f} (pairs {[round(r, 2) for r in ratios]})")
            share = ", ".join(f"{g} {v / (n_rows * args.repeats) * 1e3:.1f}" for g, v in used.items())
            print(f"[cpu]  {label:33s} {per_cpu_s:7.1f} rows per CPU-second (ratio {per_cpu_s / pil_here:.2f}); "
                  f"CPU ms a row: {share}; {per_worker_cpu_s:.1f} rows per worker CPU-second (ratio "
                  f"{per_worker_cpu_s / pil_here:.2f}; pil_only between these runs: {pil_here:.1f} rows/s)")
        ray.shutdown()

    # padding: MATH-Vision (448 geometry) and the synthetic corpus (tiny 56 px geometry)
    out = preprocess_batch(table, model_dir, pre)
    lengths = [len(x) for x, e in zip(out.column("input_ids").to_pylist(), out.column("error").to_pylist(),
                                      strict=True) if not e]
    res["padding_mathv"] = padding_report("MATH-Vision testmini", lengths, args.batch_rows, args.budget_mathv)
    from r1v.data.schema import read_corpus
    from r1v.data.synthetic import generate

    paths = generate(work / "synthetic", n_train=512, n_test=0)
    syn = read_corpus(paths["train"])
    tiny_dir = save_tiny(56, work / "tiny56")
    syn_pre = PreprocessConfig().model_dump()
    out = preprocess_batch(syn, tiny_dir, syn_pre)
    lengths = [len(x) for x in out.column("input_ids").to_pylist() if x]
    res["padding_synthetic"] = padding_report("synthetic", lengths, args.batch_rows, args.budget_synthetic)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
