"""`r1v eval run`: generate K samples per benchmark item with a model in this process (no Ray), grade them with the
benchmark's official rules, and log the run to MLflow (`r1v.eval.runner.run_benchmark`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from r1v.eval.config import EvalConfig
from r1v.eval.items import ENV_DATA_ROOT
from r1v.eval.runner import GRADER_OF, run_benchmark
from r1v.workflow import tracking


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="r1v model directory (e.g. a stage's saved model)")
    p.add_argument("--benchmark", required=True, choices=sorted(GRADER_OF),
                   help="benchmark to generate on and grade ('mathv-testmini' has its images shipped)")
    p.add_argument("--samples", type=int, default=1, help="K responses per item; pass@1 is their mean")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--data-root", type=Path, default=None,
                   help=f"benchmark data folder (default: ${ENV_DATA_ROOT} or ../shared/data/benchmarks)")
    p.add_argument("--dataset", type=Path, default=None,
                   help="official Parquet where the benchmark needs it (MathVista images, MMMU questions)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/eval/BENCHMARK-TIMESTAMP)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.05,
                   help="1.05 as in the released R1V inference")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="the paper allows up to 64K")
    p.add_argument("--max-length", type=int, default=8192, help="longest prompt in tokens (images included)")
    p.add_argument("--max-tiles", type=int, default=6, help="image tiles per image")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--engine", default="transformers",
                   help="rollout engine (r1v.generation.engines), run in this process: `r1v eval run` starts no Ray "
                   "cluster (the workflow's eval stage runs its engines as Ray actors)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences per engine generate() call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="grading processes (0: in this process)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///OUT/mlflow.db)")
    p.add_argument("--experiment", default="r1v-eval", help="MLflow experiment name")
    p.set_defaults(fn=run_main)
    return p


def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``run`` to the ``r1v eval`` sub-parser group."""
    return _configure(subparsers.add_parser(
        "run", help="generate K samples per benchmark item with a model (in this process, no Ray), grade them, "
        "log to MLflow",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig an ``r1v eval run`` command line stands for (validated: bad values name the field)."""
    return EvalConfig.model_validate({
        "model": str(args.model),
        "benchmark": args.benchmark,
        "samples": args.samples,
        "limit": args.limit,
        "preprocess": {"max_tiles": args.max_tiles, "max_length": args.max_length,
                       "system_prompt": args.system_prompt},
        "sampling": {"temperature": args.temperature, "top_p": args.top_p,
                     "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty},
        "engine": {"kind": args.engine, "max_batch": args.max_batch},
        "seed": args.seed,
    })


def run_main(args: argparse.Namespace) -> int:
    """``r1v eval run``: one MLflow run around :func:`run_benchmark`; prints pass@1 and the breakdown."""
    import pydantic

    try:
        c = config_from_args(args)
    except pydantic.ValidationError as e:
        print(f"r1v eval run: invalid arguments:\n{e}", file=sys.stderr)
        return 2
    if not Path(c.model).is_dir():
        print(f"r1v eval run: --model {c.model} is not a directory", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / "eval" / f"{c.benchmark}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or tracking.default_tracking_uri(out)
    exp = tracking.ensure_experiment(uri, args.experiment, out.resolve() / "mlartifacts")
    run_id = tracking.start_run(uri, exp, f"{c.benchmark}-{Path(c.model).name}",
                                tags={"r1v.benchmark": str(c.benchmark), "r1v.out": str(out.resolve())})
    log = tracking.RunLogger(uri, run_id)
    log.params(c.model_dump())
    try:
        res = run_benchmark(c, out, log, dataset=args.dataset, data_root=args.data_root, workers=args.workers)
    except (ValueError, FileNotFoundError, KeyError) as e:
        tracking.set_status(uri, run_id, "FAILED")
        print(f"r1v eval run: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except BaseException:
        tracking.set_status(uri, run_id, "FAILED")
        raise
    tracking.set_status(uri, run_id, "FINISHED")
    mean, std = res["pass_at_1"], res["pass_at_1_std"]
    print(f"{c.benchmark}: pass@1 {100 * mean:.2f} ± {100 * std:.2f} over {c.samples} sample(s) of "
          f"{res['items']} items ({res['quarantined']} quarantined)")
    print(res["report"].format())
    print(f"results in {out} (MLflow run {run_id}, store {uri})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m r1v.cli.eval``)."""
    parser = _configure(argparse.ArgumentParser(prog="r1v eval run", description=__doc__))
    return run_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
