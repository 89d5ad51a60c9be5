"""The `local` scorer: a tiny random sequence-classification reward head (built here, no download) scoring in
Ray actors, equal to the model run by hand; and a generative judge (r1v's tiny LLM) through the rollout engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from score_corpora import read, row

from r1v.judges.base import compile_pattern, parse_score
from r1v.judges.local import LocalScorerHost
from r1v.rounds.config import ScoreConfig
from r1v.rounds.scoring import score_corpus
from r1v.workflow import tracking

LONG = "<think>\n" + "let me think step by step " * 40 + "\n</think>\nAnswer: \\boxed{7}"


def _reward_model(path: Path, num_labels: int) -> str:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from r1v.model.tokenizer import build_tiny_tokenizer
    from r1v.model.tokens import PAD

    tok = build_tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                      pad_token_id=tok.convert_tokens_to_ids(PAD), eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _by_hand(model_dir: str, rows: list[dict]) -> list[float]:
    """Each row alone (no padding): 5 * sigmoid(logit), the stage's default one-label mapping onto 0..5."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for r in rows:
        conv = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        ids = tok(tok.apply_chat_template(conv, tokenize=False), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(5 / (1 + math.exp(-float(model(input_ids=ids).logits[0, 0]))))
    return out


def test_reward_head_in_ray_actors_scores_like_the_model_by_hand(ray_cluster, corpus_factory,
                                                                  tmp_path: Path) -> None:
    model = _reward_model(tmp_path / "rm", 1)
    rows = [row("a"), row("b", answer="8", question="What is 1 + 7?"), row("c", response="<think>\nhm\n</think>"),
            row("long", response=LONG), row("none", response=None), row("d", question="Sum?")]
    src = corpus_factory(rows)
    scorer = {"kind": "local", "model": model, "head": "reward", "num_actors": 2, "num_cpus": 0.5,
              "batch_size": 2, "max_length": 120}
    res = score_corpus(ScoreConfig(corpus=src, scorer=scorer, batch_rows=4, max_quarantined_fraction=0.5),
                       tmp_path / "st", tracking.RunLogger(None, None))
    got = {r["id"]: r["rm_score"] for r in read(res["corpus"])}
    assert list(got) == ["a", "b", "c", "d"]
    want = _by_hand(model, [r for r in rows if r["id"] in got])
    assert list(got.values()) == pytest.approx(want, abs=1e-4)  # batched, padded, in actors = one by one
    assert len(set(got.values())) == 4 and all(0 < s < 5 for s in got.values())
    bad = {r["id"]: r["reason"] for r in read(res["quarantine"])}
    assert bad == {"long": "too_long", "none": "no_response"}


def test_class_head_reductions_and_a_generative_judge(tiny_assets, tmp_path: Path) -> None:
    from r1v.generation.engines import Request, TransformersEngine
    from r1v.judges.base import row_fields

    model = _reward_model(tmp_path / "rm6", 6)
    fields = [row_fields(r) for r in (row("a"), row("b", answer="8"))]
    base = {"kind": "local", "model": model, "head": "reward", "batch_size": 2}
    expected = LocalScorerHost({**base, "reduce": "expected"}, 0, 5).score(fields)
    argmax = LocalScorerHost({**base, "reduce": "argmax"}, 0, 5).score(fields)
    assert all(0 <= s <= 5 and r == "" for s, r, _ in expected)
    assert all(s in (0, 1, 2, 3, 4, 5) for s, _, _ in argmax)

    judge = {"kind": "local", "model": tiny_assets["llm"], "head": "judge", "max_new_tokens": 6, "batch_size": 2,
             "prompt": "Rate: {question} {response}", "score_pattern": r"([0-9])"}
    host = LocalScorerHost(judge, 0, 5)
    verdicts = host.score(fields)
    engine = TransformersEngine(tiny_assets["llm"], logprobs=False)
    for f, (score, reason, detail) in zip(fields, verdicts, strict=True):
        reply = engine.generate([Request(host._judge_ids(f))], {"temperature": 0.0, "max_new_tokens": 6}, 1, 0)
        want = parse_score(reply[0][0].text, compile_pattern(r"([0-9])"))
        assert score == want and (reason == "" if want is not None else reason == "unparsable_score")
        assert want is not None or detail == f"reply: {reply[0][0].text[:500]!r}"
