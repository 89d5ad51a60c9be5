"""Worker-noise settings: the environment variables and library switches that keep Ray, transformers, Ray Data
and DeepSpeed from flooding the console and the logs, in the driver and in every worker."""

from __future__ import annotations

import os
import sys

# Environment for the driver and (inherited by a local cluster, or via runtime_env) the Ray workers.
FIX_ENV = {
    # Ray Train V2 patches `print` in its workers to log through the root logger *and*, because Ray's worker
    # has replaced sys.stdout, also print it: every worker print reached the console twice (stdout and stderr).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # Ray Data's per-operator bars: \r-redrawn, unreadable in a file
    # Dedup holds repeated worker lines up to 5 s and prints them later (after the stage, into the wrong log):
    # in a log file every line is wanted anyway.
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of HF tokenizers
    "RAY_COLOR_PREFIX": "0",  # no ANSI colour codes around "(RayTrainWorker pid=...)" in the log files
}

def worker_env(verbose: bool) -> dict[str, str]:
    """The variables Ray workers should see; a caller's own settings win."""
    env = dict(FIX_ENV) if verbose else {**FIX_ENV, **QUIET_ENV}
    return {k: os.environ.get(k, v) for k, v in env.items()}


def quiet_libraries(verbose: bool = False) -> None:
    """Set the noise switches in this process before Ray, transformers or Ray Data are imported (most read their
    environment at import), and flip the runtime switches of those already imported."""
    for k, v in worker_env(verbose).items():
        os.environ.setdefault(k, v)
    if verbose:
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


def quiet_worker(use_gpu: bool) -> None:
    """In a training worker: DeepSpeed's accelerator auto-detection warns "Setting accelerator to CPU" in every
    worker; naming the accelerator skips the detection (only when it is certain: a CPU run)."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
