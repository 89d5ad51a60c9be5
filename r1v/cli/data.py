"""`r1v data import --format F SRC --out DST`: the `data.import` stage from the command line.

DST is the corpus directory; the quarantine and the report go next to it (`DST.quarantine.parquet`,
`DST.report.json`) unless given, so DST itself stays a clean Parquet dataset that stages can read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r1v.core.config import PreprocessConfig
from r1v.data.config import FORMATS, DataImportConfig


def cmd_import(args: argparse.Namespace) -> int:
    # imported on use, to keep pyarrow, PIL, numpy out of light paths
    from pydantic import ValidationError

    from r1v.data.importers.driver import import_corpus

    out = Path(args.out)
    pre = {k: v for k, v in {"max_length": args.max_length, "max_tiles": args.max_tiles,
                             "system_prompt": args.system_prompt}.items() if v is not None}
    fields = {"format": args.format, "source": args.source, "image_root": args.image_root,
              "model": args.model, "source_name": args.source_name, "on_too_long": args.on_too_long,
              "max_pixels": args.max_pixels, "allow_outside_root": args.allow_outside_root or None,
              "row_timeout_s": args.row_timeout, "rows_per_file": args.rows_per_file, "workers": args.workers,
              "limit": args.limit}
    try:
        cfg = DataImportConfig(preprocess=PreprocessConfig(**pre),
                               **{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        print(f"r1v: error: {e}", file=sys.stderr)
        return 2
    quarantine = Path(args.quarantine or out.with_name(out.name + ".quarantine.parquet"))
    report = Path(args.report or out.with_name(out.name + ".report.json"))
    try:
        rep = import_corpus(cfg, out, quarantine, report, progress=None if not args.quiet else False)
    except (FileNotFoundError, ValueError) as e:  # no input files; a JSON array that cannot be parsed on
        print(f"r1v: error: {e}", file=sys.stderr)
        return 2
    print(f"read {rep['rows_read']}, written {rep['rows_written']}, quarantined {rep['rows_quarantined']}"
          + (f" ({json.dumps(rep['by_reason'])})" if rep["by_reason"] else "")
          + f", truncated {rep['rows_truncated']}, images converted {rep['images_converted']}"
          + f", {rep['rows_per_second']} rows/s")
    print(f"corpus     {out}\nquarantine {quarantine}\nreport     {report}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data import` to the top-level parser's subcommands."""
    data = subparsers.add_parser("data", help="corpus tools: import external datasets")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser(
        "import", help="import a corpus: LLaVA, OpenAI/ShareGPT, WebDataset, Parquet, JSONL folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a file, a directory or a glob")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument("--image-root", help="root of relative image paths (default: the source file's folder)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read image paths that resolve outside the image root (default: quarantine them)")
    p.add_argument("--source-name", help="value of the corpus `source` column")
    p.add_argument("--model", help="model dir for the tokenised length check (omit to skip it)")
    p.add_argument("--max-length", type=int, help="context length in tokens (default 1024)")
    p.add_argument("--max-tiles", type=int, help="tiles per image, as in SFT preprocess (default 6)")
    p.add_argument("--system-prompt", help="system prompt SFT will add (counts toward the length)")
    p.add_argument("--on-too-long", choices=("drop", "truncate"))
    p.add_argument("--max-pixels", type=int, help="decompression-bomb guard (default 50M)")
    p.add_argument("--rows-per-file", type=int)
    p.add_argument("--workers", type=int, help="validation processes (default 1)")
    p.add_argument("--row-timeout", type=float,
                   help="seconds a row's validation may take before it is quarantined as timeout (default 60)")
    p.add_argument("--limit", type=int, help="import only the first N rows")
    p.add_argument("--quarantine", help="quarantine Parquet (default DST.quarantine.parquet)")
    p.add_argument("--report", help="report JSON (default DST.report.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_import)
    return data
