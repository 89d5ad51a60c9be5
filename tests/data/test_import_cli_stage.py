"""`r1v data import` and the `data.import` stage kind, driven directly (until they are wired in)."""

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_import_helpers import png, write_jsonl

from r1v.cli.data import add_data_parser
from r1v.data.config import DataImportConfig
from r1v.data.schema import read_corpus
from r1v.data.stage import data_import
from r1v.workflow import kinds
from r1v.workflow.runner import StageContext


def _corpus(root: Path) -> Path:
    (root / "a.png").write_bytes(png())
    return write_jsonl(root / "chat.jsonl", [
        {"id": "ok", "messages": [{"role": "user", "content": "<image> hi"},
                                  {"role": "assistant", "content": "yo"}], "images": ["a.png"]},
        {"id": "bad", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
    ])


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="r1v")
    add_data_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


def test_cli_import(tmp_path, capsys) -> None:
    src = _corpus(tmp_path)
    argv = ["data", "import", "--format", "openai", str(src), "--out", str(tmp_path / "c"), "--quiet"]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith('read 2, written 1, quarantined 1 ({"empty_turn": 1})')
    assert read_corpus(tmp_path / "c").num_rows == 1
    assert pq.read_table(tmp_path / "c.quarantine.parquet").column("reason").to_pylist() == ["empty_turn"]
    assert json.loads((tmp_path / "c.report.json").read_text())["rows_read"] == 2


def test_cli_rejects_bad_options(tmp_path, capsys) -> None:
    src = _corpus(tmp_path)
    assert _cli(["data", "import", "--format", "openai", str(src), "--out", str(tmp_path / "c"),
                 "--max-pixels", "0"]) == 2
    assert "max_pixels" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('[{"id": 1}, {"id": ]')
    assert _cli(["data", "import", "--format", "llava", str(tmp_path / "broken.json"), "--out",
                 str(tmp_path / "c")]) == 2
    assert "invalid JSON in element 1" in capsys.readouterr().err and not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        _cli(["data", "import", "--format", "csv", str(src), "--out", str(tmp_path / "c")])


def test_stage(tmp_path) -> None:
    assert kinds.get("data.import").run_function() is data_import
    src = _corpus(tmp_path)
    ctx = StageContext(name="imp", kind="data.import", run_dir=tmp_path, stage_dir=tmp_path / "stage",
                       attempt=1, tracking_uri="", mlflow_run_id="")
    (tmp_path / "stage").mkdir()
    outs = data_import(ctx, DataImportConfig(format="openai", source=str(src)))
    assert set(outs) == {"corpus", "quarantine", "report"} and all(Path(p).exists() for p in outs.values())
    rep = json.loads(Path(outs["report"]).read_text())
    assert (rep["rows_read"], rep["rows_written"], rep["by_reason"]) == (2, 1, {"empty_turn": 1})
    assert read_corpus(outs["corpus"]).column("source").to_pylist() == ["chat"]


def test_config_is_strict() -> None:
    assert kinds.get("data.import").config_class() is DataImportConfig
    with pytest.raises(ValueError, match="extra"):
        DataImportConfig(format="llava", source="x", max_lenght=3)
    with pytest.raises(ValueError):
        DataImportConfig(format="llava", source="x", on_too_long="cut")
