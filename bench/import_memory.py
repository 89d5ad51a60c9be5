"""Benchmark: peak memory of `r1v data import` on a corpus much larger than the memory given to it.

Builds a synthetic LLaVA corpus (one JSON array, or JSONL) whose JSON alone is bigger than `--bound-mb`, with
a distinct noise PNG per row (so the output Parquet, which carries every row's image bytes, is bigger still),
plus a broken row (missing image) in every thousand. The import runs in a child process, optionally under
RLIMIT_DATA = bound (the memory it is given: heap and anonymous mappings), and reports its peak RSS
(getrusage ru_maxrss), its RSS right before the import started (interpreter + libraries), and the peak of
pyarrow's memory pool; it fails when the counts do not reconcile or the peak exceeds the bound.

    python bench/import_memory.py [--rows 80000] [--text-kb 6] [--bound-mb 384] [--format json|jsonl]
                                  [--enforce] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1 << 20


def build_corpus(root: Path, rows: int, text_kb: int, n_images: int, fmt: str) -> Path:
    """Write the corpus row by row (the builder stays small too); every 1000th row has a missing image."""
    import numpy as np
    from PIL import Image

    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
        (img / f"{i}.png").write_bytes(buf.getvalue())
    filler = ("The quick brown fox reasons step by step about the picture. " * 200)[: text_kb * 1024]
    path = root / f"corpus.{fmt}"
    with open(path, "w") as f:
        f.write("[\n" if fmt == "json" else "")
        for i in range(rows):
            image = f"{i % n_images}.png" if i % 1000 != 999 else "missing.png"
            row = {"id": f"r{i}", "image": image, "conversations": [
                {"from": "human", "value": f"<image>\nQuestion {i}: what is in the image?"},
                {"from": "gpt", "value": f"<think>\n{filler}</think>\nAnswer {i}."}]}
            sep = (",\n" if i < rows - 1 else "\n") if fmt == "json" else "\n"
            f.write(json.dumps(row) + sep)
        f.write("]\n" if fmt == "json" else "")
    return path


def child(args: argparse.Namespace) -> None:
    """The measured process: import only, then print its figures as one JSON line."""
    if args.enforce:
        resource.setrlimit(resource.RLIMIT_DATA, (args.bound_mb * MB, args.bound_mb * MB))
    import pyarrow as pa

    from r1v.data.config import DataImportConfig
    from r1v.data.importers.driver import import_corpus

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    work = Path(args.workdir)
    cfg = DataImportConfig(format="llava", source=str(work / f"corpus.{args.format}"),
                           image_root=str(work / "images"), rows_per_file=args.rows_per_file,
                           buffer_bytes=args.buffer_mb * MB)
    out = work / "out"
    rep = import_corpus(cfg, out / "corpus", out / "q.parquet", out / "report.json", progress=False)
    rep["child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rep["child_baseline_rss_mb"] = base
    rep["arrow_pool_peak_mb"] = pa.default_memory_pool().max_memory() / MB
    print("RESULT " + json.dumps(rep))


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=80_000)
    ap.add_argument("--text-kb", type=int, default=6, help="assistant text per row")
    ap.add_argument("--images", type=int, default=0, help="distinct images (64x64 noise PNG, ~12 KB), "
                                                          "referenced round-robin; 0: one per row")
    ap.add_argument("--format", choices=("json", "jsonl"), default="json")
    ap.add_argument("--bound-mb", type=int, default=384, help="memory given to the importer")
    ap.add_argument("--enforce", action="store_true", help="set RLIMIT_DATA to the bound in the child")
    ap.add_argument("--rows-per-file", type=int, default=10_000)
    ap.add_argument("--buffer-mb", type=int, default=32)
    ap.add_argument("--workdir", help="where to build (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v-import-bench-"))
    try:
        t0 = time.time()
        src = build_corpus(work, args.rows, args.text_kb, args.images or args.rows, args.format)
        print(f"built {src} ({_size(src) / MB:.0f} MB, {args.rows} rows) in {time.time() - t0:.0f}s",
              flush=True)
        cmd = [sys.executable, __file__, "--child", "--workdir", str(work), "--format", args.format,
               "--bound-mb", str(args.bound_mb), "--rows-per-file", str(args.rows_per_file),
               "--buffer-mb", str(args.buffer_mb)] + (["--enforce"] if args.enforce else [])
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        rep = json.loads(line[len("RESULT "):])
        children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        out_mb = _size(work / "out" / "corpus") / MB
        print(f"input JSON            {_size(src) / MB:8.0f} MB  ({args.format}, one file)")
        n_img = args.images or args.rows
        print(f"input images          {_size(work / 'images') / MB:8.0f} MB  ({n_img} files)")
        print(f"output corpus         {out_mb:8.0f} MB  ({rep['corpus_files']} part files)")
        how = "enforced: RLIMIT_DATA" if args.enforce else "not enforced"
        print(f"memory bound          {args.bound_mb:8d} MB  ({how})")
        print(f"peak RSS (child)      {rep['child_peak_rss_mb']:8.0f} MB  "
              f"(getrusage; parent sees {children_peak:.0f})")
        print(f"RSS before import     {rep['child_baseline_rss_mb']:8.0f} MB  (interpreter + libraries)")
        print(f"arrow pool peak       {rep['arrow_pool_peak_mb']:8.0f} MB")
        print(f"rows read/written/q   {rep['rows_read']} / {rep['rows_written']} / {rep['rows_quarantined']} "
              f"{rep['by_reason']}")
        print(f"throughput            {rep['rows_read'] / wall:8.0f} rows/s  ({wall:.0f}s wall)")
        ok = rep["reconciled"] and rep["child_peak_rss_mb"] < args.bound_mb
        print("OK: peak below the bound, counts reconcile" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
