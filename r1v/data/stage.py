"""The data stage kinds: `data.synthetic` (a visual arithmetic task) and `data.import` (an external corpus in, an
r1v corpus + quarantine + report out)."""

from __future__ import annotations

from typing import Any

from r1v.data.config import DataImportConfig, SyntheticDataConfig
from r1v.workflow.runner import StageContext


def synthetic_data(ctx: StageContext, c: SyntheticDataConfig) -> dict[str, Any]:
    # imported on use, to keep pyarrow, PIL, numpy out of light paths
    from r1v.data.synthetic import generate

    paths = generate(ctx.stage_dir / "corpus", c.n_train, c.n_test, seed=c.seed, width=c.width, height=c.height,
                     max_value=c.max_value, ops=list(c.ops), corrupt_rows=c.corrupt_rows)
    ctx.log.metrics({"rows_train": c.n_train, "rows_test": c.n_test, "rows_corrupted": c.corrupt_rows}, 0)
    return {"train": str(paths["train"]), "test": str(paths["test"])}


def data_import(ctx: StageContext, c: DataImportConfig) -> dict[str, Any]:
    """Re-runs from scratch on resume: outputs are written atomically, so a crash leaves nothing half-done."""
    # imported on use, to keep pyarrow, PIL, numpy out of light paths
    from r1v.data.importers.driver import import_corpus

    paths = {"corpus": ctx.stage_dir / "corpus", "quarantine": ctx.stage_dir / "quarantine.parquet",
             "report": ctx.stage_dir / "report.json"}
    rep = import_corpus(c, paths["corpus"], paths["quarantine"], paths["report"], progress=False)
    metrics = {k: rep[k] for k in ("rows_read", "rows_written", "rows_quarantined", "rows_truncated",
                                   "images_converted", "rows_per_second")}
    metrics.update({f"quarantined/{k}": v for k, v in rep["by_reason"].items()})
    ctx.log.metrics(metrics, 0)
    ctx.log.dict(rep, "import_report.json")
    return {k: str(p) for k, p in paths.items()}
