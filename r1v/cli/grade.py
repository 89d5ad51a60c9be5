"""``r1v eval grade``: grade a predictions file offline and print accuracy with a per-category breakdown.

Wire-up: ``add_grade_parser(subparsers)`` adds the ``grade`` sub-command to an argparse sub-parser group and
``grade_main(args)`` runs it.  ``python -m r1v.cli.grade ...`` runs it stand-alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from r1v.eval.graders import GRADERS
from r1v.eval.grading import DEFAULT_TIMEOUT_S, grade_predictions
from r1v.eval.items import ENV_DATA_ROOT, default_data_root
from r1v.eval.predictions import PredictionsError


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--benchmark",
        required=True,
        choices=GRADERS.names(),
        help="benchmark whose official rules to apply ('math': lines carry their own 'answer')",
    )
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        help="r1v predictions JSONL (id, response[, sample]) or a benchmark's published outputs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="per-response verdicts JSONL (default: <predictions name>.verdicts.jsonl here)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"benchmark data folder (default: ${ENV_DATA_ROOT} or ../shared/data/benchmarks)",
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="official Parquet files where the benchmark needs them (MMMU options)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="grading processes (0: in this process, no time bound)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds allowed per response before it is graded wrong with reason 'timeout'",
    )
    parser.set_defaults(fn=grade_main)
    return parser


def add_grade_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``grade`` to an argparse sub-parser group (``r1v eval grade``)."""
    return _configure(
        subparsers.add_parser(
            "grade", help="grade predictions offline with the official rules", description=__doc__
        )
    )


def grade_main(args: argparse.Namespace) -> int:
    """Run the grade command; 0 on success, 2 on a malformed predictions file or missing data."""
    root = default_data_root(args.data_root)
    try:
        report = grade_predictions(
            args.benchmark,
            args.predictions,
            root,
            dataset=args.dataset,
            workers=args.workers,
            timeout=args.timeout,
        )
    except PredictionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was graded", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    out = args.out or Path(
        f"{Path(args.predictions).name.removesuffix('.jsonl').removesuffix('.json')}.verdicts.jsonl"
    )
    report.write_jsonl(out)
    print(report.format())
    print(f"verdicts written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m r1v.cli.grade``)."""
    parser = _configure(argparse.ArgumentParser(prog="r1v eval grade", description=__doc__))
    return grade_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
