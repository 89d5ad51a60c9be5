"""Malformed predictions: file, line and problem are named, nothing is graded, the exit code is non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOOD = {"id": "test/precalculus/807.json", "response": "Answer: \\boxed{(3, \\frac{\\pi}{2})}"}


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "test/algebra/1072.json", "response": ', "invalid JSON"),
        ('{"id": "test/algebra/1072.json"}', "missing field 'response'"),
        ('{"id": "no/such/item", "response": "\\\\boxed{1}"}', "unknown id 'no/such/item'"),
        ('{"id": "test/algebra/1072.json", "response": 5}', "field 'response' must be a string"),
        (
            '{"id": "test/algebra/1072.json", "response": "x", "sample": -1}',
            "'sample' must be a non-negative",
        ),
        (json.dumps(GOOD), "duplicate prediction"),
    ],
)
def test_malformed_line_is_named(run_grade, tmp_path, capsys, bench_root, bad_line, message):
    path = _write(tmp_path, [json.dumps(GOOD), bad_line])
    out = tmp_path / "v.jsonl"
    rc = run_grade(["--benchmark", "math500", "--predictions", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert f"{path}:2: " in err and message in err
    assert "nothing was graded" in err
    assert not out.exists()


def test_free_math_requires_answer_field(run_grade, tmp_path, capsys):
    path = _write(
        tmp_path,
        [
            json.dumps({"id": "a", "response": "\\boxed{2}", "answer": "2"}),
            json.dumps({"id": "b", "response": "\\boxed{2}"}),
        ],
    )
    assert run_grade(["--benchmark", "math", "--predictions", str(path), "--out", str(tmp_path / "v")]) == 2
    assert f"{path}:2: missing field 'answer'" in capsys.readouterr().err


def test_free_math_grades_lines_with_their_own_answers(run_grade, tmp_path, capsys):
    lines = [
        json.dumps({"id": str(i), "response": f"Answer: \\boxed{{{r}}}", "answer": g, "sample": 0})
        for i, (r, g) in enumerate([("\\frac12", "0.5"), ("3", "4"), ("x^2-1", "(x-1)(x+1)")])
    ]
    out = tmp_path / "v.jsonl"
    assert (
        run_grade(["--benchmark", "math", "--predictions", str(_write(tmp_path, lines)), "--out", str(out)])
        == 0
    )
    verdicts = [json.loads(x) for x in out.read_text().splitlines()]
    assert [v["correct"] for v in verdicts] == [True, False, True]
    assert verdicts[0]["extracted"] == "\\frac12" and verdicts[1]["reason"] == "wrong"
    assert "accuracy 66.67% (2/3)" in capsys.readouterr().out


def test_unknown_benchmark_and_missing_file(run_grade, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_grade(["--benchmark", "nope", "--predictions", "x"])
    assert run_grade(["--benchmark", "math500", "--predictions", str(tmp_path / "absent.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_mmmu_multiple_choice_needs_options(run_grade, tmp_path, capsys, bench_root):
    path = _write(tmp_path, [json.dumps({"id": "validation_Accounting_1", "response": "Answer: \\boxed{B}"})])
    assert run_grade(["--benchmark", "mmmu", "--predictions", str(path), "--out", str(tmp_path / "v")]) == 2
    assert "needs its options" in capsys.readouterr().err
    path = _write(
        tmp_path,
        [
            json.dumps(
                {
                    "id": "validation_Accounting_1",
                    "response": "<think>(A)?</think>Answer: \\boxed{B}",
                    "options": ["1", "2", "3", "4"],
                }
            )
        ],
    )
    assert run_grade(["--benchmark", "mmmu", "--predictions", str(path), "--out", str(tmp_path / "v")]) == 0
    assert "accuracy 100.00% (1/1)" in capsys.readouterr().out


def test_module_entry_point_subprocess(tmp_path, bench_root):
    """`python -m r1v.cli.grade` works until the command is wired into `r1v eval grade`."""
    path = _write(tmp_path, [json.dumps(GOOD), '{"id": "test/algebra/1072.json"'])
    env = {**os.environ, "R1V_BENCHMARKS": str(bench_root)}
    cmd = [
        sys.executable,
        "-m",
        "r1v.cli.grade",
        "--benchmark",
        "math500",
        "--predictions",
        str(path),
        "--out",
        str(tmp_path / "v.jsonl"),
    ]
    bad = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and f"{path}:2: invalid JSON" in bad.stderr
    path.write_text(json.dumps(GOOD) + "\n")
    ok = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "math500: accuracy 100.00% (1/1)" in ok.stdout
    assert json.loads((tmp_path / "v.jsonl").read_text())["reason"] == "correct"
    assert REPO.exists()
