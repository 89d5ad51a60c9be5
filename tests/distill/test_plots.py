"""Length plots of the distill stage (`r1v.distill.plots`): points read back from corpora, OLS slopes, the PNG,
the artifacts logged; a corpus without levels draws the penalty panel only."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1v.data.prompt import THINK_OPENER
from r1v.data.schema import make_row
from r1v.distill import plots


class WordTokenizer:
    """One token per word: lengths a test can count by eye."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


class Log:
    def __init__(self) -> None:
        self.artifacts: list[tuple[Path, str | None]] = []
        self.logged: dict[str, float] = {}

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.logged.update(values)


def corpora(root: Path, levels: bool = True) -> tuple[Path, Path]:
    """Input: level L has a 2L-word chain and penalty 2 - L/4; distilled: level L has chain_tokens 10L."""
    rows = [make_row(f"r{i}", [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": THINK_OPENER + " ".join(["w"] * 2 * lv)}],
                     answer="1", meta={"level": lv} if levels else {})
            for i, lv in enumerate([1, 1, 2, 2, 3, 3])]
    table = pa.Table.from_pylist(rows).append_column("penalty", pa.array([2 - r / 4 for r in [1, 1, 2, 2, 3, 3]]))
    (root / "in").mkdir()
    pq.write_table(table, root / "in" / "part-00000.parquet")
    out = table.append_column("distill", pa.array(["kept", "rewritten"] * 3)) \
        .append_column("chain_tokens", pa.array([10, 10, 20, 20, 30, 30], pa.int32())) \
        .append_column("distill_penalty", table.column("penalty"))
    (root / "out").mkdir()
    pq.write_table(out, root / "out" / "part-00000.parquet")
    return root / "in", root / "out"


def test_points_and_slopes(tmp_path: Path) -> None:
    cin, cout = corpora(tmp_path)
    before = plots.reference_points(cin, WordTokenizer())
    assert before["tokens"] == [3, 3, 5, 5, 7, 7] and before["level"] == [1, 1, 2, 2, 3, 3]  # words + end of turn
    s = plots.length_stats(before)
    assert s["slope_per_level"] == pytest.approx(2.0) and s["slope_per_penalty"] == pytest.approx(-8.0)
    assert s["tokens_by_level"] == {"1": 3.0, "2": 5.0, "3": 7.0}
    kept = plots.distilled_points(cout, "kept")
    assert kept["tokens"] == [10, 20, 30] and plots.length_stats(kept)["slope_per_level"] == pytest.approx(10.0)
    assert plots.ols_slope([None, 1.0], [1, 2]) is None and plots.ols_slope([2.0, 2.0], [1, 2]) is None


def test_distill_plots_writes_and_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "load_tokenizer", lambda model: WordTokenizer())
    cin, cout = corpora(tmp_path)
    log = Log()
    res = plots.distill_plots(cin, cout, "model", tmp_path / "stage", log)
    assert res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads(res["json"].read_text())
    assert stats["after: distilled (all)"]["slope_per_level"] == pytest.approx(10.0)
    assert [(p.name, a) for p, a in log.artifacts] == [("lengths.png", "plots"), ("lengths.json", "plots")]
    assert log.logged["before_slope_per_level"] == pytest.approx(2.0)


def test_without_levels_only_the_penalty_panel(tmp_path: Path) -> None:
    cin, _ = corpora(tmp_path, levels=False)
    pts = plots.reference_points(cin, WordTokenizer())
    assert pts["level"] == [None] * 6 and plots.length_stats(pts)["slope_per_level"] is None
    assert plots.plot_lengths({"before": pts}, tmp_path / "p.png").stat().st_size > 0
