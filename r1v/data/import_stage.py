"""The `data.import` stage kind: an external corpus in, an r1v corpus + quarantine + report out."""

from __future__ import annotations

from typing import Any

from r1v.data.import_config import DataImportConfig
from r1v.workflow import STAGES, StageContext


@STAGES.register("data.import")
def data_import(ctx: StageContext, c: DataImportConfig) -> dict[str, Any]:
    """Re-runs from scratch on resume: outputs are written atomically, so a crash leaves nothing half-done."""
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
