"""The transfer probes' reading of predictions: cells parsed in both written forms, rates against the true digits,
accuracy split by whether the item's cells were read."""

from __future__ import annotations

import json

import pytest

from r1v.world.probes import (
    PROBE_QUESTION,
    accuracy,
    boxed_cells,
    chain_reads,
    given_perception,
    perceived,
    perception_rows,
    read_cells,
    read_rate,
)


def test_read_cells_takes_each_letters_first_mention_and_boxed_cells_the_box():
    assert read_cells("</think>\nAnswer: \\boxed{A7B7C6D3}") == {"A": 7, "B": 7, "C": 6, "D": 3}
    assert read_cells("A = 3, C = 5. 3 + 5 = 8.</think>\nAnswer: \\boxed{8}") == {"A": 3, "C": 5}
    assert read_cells("A = 1, A = 2, B=4") == {"A": 1, "B": 4}
    assert read_cells("Compute A * B.") == {}
    # a chain that read A as 1 and boxed a copy with A2: the read is the chain's, the box's is the box's
    text = "A = 1, B = 3.</think>\\boxed{A2B3C4D5}"
    assert read_cells(text) == {"A": 1, "B": 3, "C": 4, "D": 5}
    assert boxed_cells(text) == {"A": 2, "B": 3, "C": 4, "D": 5}
    assert boxed_cells("A = 1, B = 3.</think>\\boxed{4}") == {} and boxed_cells("A1") == {}


def test_chain_reads_are_the_first_segment_only():
    assert chain_reads("C = 5, B = 4, D = 4. 5 + 4 = 9. Check: B = 9.") == {"C": 5, "B": 4, "D": 4}
    assert chain_reads("</think>\nAnswer: \\boxed{3}") == {}


def _p(i: str, response: str, correct: float = 0.0, greedy: bool = True) -> dict:
    return {"id": i, "response": response, "correct": correct, "greedy": greedy, "sample": -1 if greedy else 0}


def test_read_rate_counts_cells_per_item_and_ignores_sampled_generations():
    digits = {"a": (1, 2, 3, 4), "b": (5, 6, 7, 8)}
    preds = [_p("a", "\\boxed{A1B2C3D4}"), _p("a", "\\boxed{A0B0C0D0}", greedy=False),
             _p("b", "\\boxed{A5B0C7}")]  # b: A and C right, B wrong, D missing
    r = read_rate(preds, digits)
    assert r["items"] == 2 and r["rate"] == pytest.approx((1 + 0.5) / 2) and r["exact"] == 0.5
    assert r["by_letter"] == {"A": 1.0, "B": 0.5, "C": 1.0, "D": 0.5}
    assert r["stderr"] == pytest.approx(0.25)  # sd of (1, 0.5) over sqrt(2)
    only_used = read_rate(preds, digits, letters={"a": ["A"], "b": ["B", "D"]})
    assert only_used["rate"] == pytest.approx(0.5)


def test_accuracy_given_perception_splits_by_the_items_reads():
    digits = {"a": (1, 2, 3, 4), "b": (5, 6, 7, 8), "c": (0, 0, 0, 0)}
    letters = {"a": ["A", "B"], "b": ["C"], "c": ["D"]}
    probe = [_p("a", "\\boxed{A1B2C9D9}"), _p("b", "\\boxed{A5B6C0D8}"), _p("c", "\\boxed{A0B0C0D0}")]
    seen = perceived(probe, digits, letters)
    assert seen == {"a": True, "b": False, "c": True}  # a: its used cells right (C, D wrong do not count)
    task = [_p("a", "", 1.0), _p("b", "", 1.0), _p("c", "", 0.0), _p("c", "", 1.0, greedy=False)]
    g = given_perception(task, seen)
    assert (g["read"]["n"], g["read"]["accuracy"]) == (2, 0.5)
    assert (g["missed"]["n"], g["missed"]["accuracy"]) == (1, 1.0)
    assert accuracy(task)["accuracy"] == pytest.approx(2 / 3)
    by_chain = perceived([_p("a", "A = 1, B = 3. 1 + 3 = 4.")], digits, letters, reader=chain_reads)
    assert by_chain == {"a": False}


def test_perception_rows_keep_image_id_and_meta_and_ask_the_probe():
    row = {"id": "world-test-000001", "images": [b"png"], "answer": "9", "source": "world/test",
           "messages": [{"role": "user", "content": "<image>\nCompute C + B + D."}],
           "meta": json.dumps({"level": 2, "digits": "0544", "expr": "C + B + D"})}
    (p,) = perception_rows([row])
    assert p["id"] == row["id"] and p["images"] == row["images"] and p["answer"] == "A0B5C4D4"
    assert p["messages"] == [{"role": "user", "content": f"<image>\n{PROBE_QUESTION}"}]
    assert json.loads(p["meta"]) == {**json.loads(row["meta"]), "probe": "transcribe"}
