"""The `distill` stage on the miniature world: the reassembled R1V model (world vision tower, fresh projector,
reasoning LLM) distils a small SFT corpus with the `rule` judge.

Half the rows ask the text form of their problem (the reasoning LLM solves most of those: kept chains), half the
image form (the fresh projector makes those mostly wrong: rewritten); one row has no answer (dropped).
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1v.distill.config import DistillConfig
from r1v.distill.distill import KEPT, NO_ANSWER, REWRITTEN, generate_with_penalties, run_distill
from r1v.grading.rewards import accuracy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from r1v.data.schema import make_row
    from r1v.model.manifest import reassemble_model
    from r1v.world.corpora import generate
    from r1v.world.load import substitute_vlm

    root = tmp_path_factory.mktemp("distill")
    sub = substitute_vlm(None, 0, root / "substitute")
    model = reassemble_model(sub["model"], sub["reasoning_llm"], root / "r1v")
    sft = generate(root / "world", n_align=1, n_sft=12, n_grpo=1, n_test=1, seed=3)["sft"]
    rows = pq.read_table(sft).to_pylist()
    for i, r in enumerate(rows[::2]):  # the text form: no image
        meta = json.loads(r["meta"])
        rows[2 * i] = make_row(r["id"], [{"role": "user", "content": meta["text_question"]}, r["messages"][-1]],
                               [], answer=r["answer"], source=r["source"], meta=meta)
    rows.append(make_row("no-answer", [{"role": "user", "content": "What is 2 + 2?"}], [], answer="",
                         source="world/sft", meta={}))
    table = pa.Table.from_pylist(rows, schema=pq.read_schema(next(iter(sorted(sft.glob("*.parquet"))))))
    table = table.append_column("penalty", pa.array([1.0 + 0.25 * (i % 3) for i in range(len(rows))]))
    (root / "corpus").mkdir()
    pq.write_table(table, root / "corpus" / "part-00000.parquet")
    return {"model": str(model), "corpus": str(root / "corpus"), "rows": table.to_pylist()}


def test_distill_counts_reconcile_and_chains_are_right(world, tmp_path):
    from r1v.data.pipeline import prepare_prompts
    from r1v.data.prompt import THINK_OPENER
    from r1v.generation.service import make_engine
    from r1v.workflow import tracking
    from r1v.world.domain import Problem, reasoning_answer

    c = DistillConfig.model_validate({
        "model": world["model"], "corpus": world["corpus"], "judge": {"kind": "rule"},
        "sampling": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 96}, "engine": {"max_batch": 16}})
    res = run_distill(c, tmp_path, tracking.RunLogger(None, None), actors=False)
    out = pq.read_table(res["corpus"]).to_pylist()
    dropped = pq.read_table(res["dropped_file"]).to_pylist()
    n_in = len(world["rows"])
    assert res["rows_in"] == n_in == res["kept"] + res["rewritten"] + res["dropped"] == len(out) + len(dropped)
    assert {d["id"]: d["reason"] for d in dropped}.get("no-answer") == NO_ANSWER
    assert res["kept"] >= 1 and res["rewritten"] >= 1, res
    assert json.loads((tmp_path / "summary.json").read_text())["kept"] == res["kept"]

    by_id = {r["id"]: r for r in world["rows"]}
    for r in out:
        turn = r["messages"][-1]
        assert turn["role"] == "assistant" and turn["content"].startswith(THINK_OPENER)
        assert accuracy(turn["content"], {"answer": r["answer"]}) == 1.0  # every distilled chain is correct
        assert r["distill"] in (KEPT, REWRITTEN) and r["chain_tokens"] > 0
        assert r["distill_penalty"] == by_id[r["id"]]["penalty"]
        if r["distill"] == REWRITTEN:  # the rule judge's solution of the row's problem
            meta = json.loads(r["meta"])
            p = Problem(tuple(int(d) for d in meta["digits"]), meta["expr"], meta["level"])
            assert turn["content"] == reasoning_answer(p)

    # kept chains are the model's own: the same generation, redone outside the stage
    answered = [{**r, "penalty": r["penalty"]} for r in world["rows"] if r["answer"]]
    prompts, failed = prepare_prompts(answered, c.model, c.preprocess)
    assert not failed
    comps = generate_with_penalties(make_engine(c.model, c), prompts, c.sampling.model_dump(), c.seed,
                                    c.engine.max_batch)
    own = {p["id"]: THINK_OPENER + cp.text for p, cp in zip(prompts, comps, strict=True)}
    kept = [r for r in out if r["distill"] == KEPT]
    assert all(r["messages"][-1]["content"] == own[r["id"]] for r in kept)
    assert all(r["chain_tokens"] <= c.sampling.max_new_tokens for r in kept)


def test_rule_judge_drops_rows_it_cannot_solve():
    from r1v.judges.rewriters import NO_SOLVER
    from r1v.world.rewriter import RuleRewriter, RuleRewriterConfig

    rw = RuleRewriter(RuleRewriterConfig())
    rng = random.Random(0)
    from r1v.world.domain import make_problem

    p = make_problem(rng, "train")
    meta = {"digits": "".join(map(str, p.digits)), "expr": p.expr, "level": p.level}
    good, bad = rw.rewrite([{"meta": json.dumps(meta)}, {"meta": "{}"}])
    assert accuracy(good.text, {"answer": str(p.answer)}) == 1.0
    assert bad.text is None and bad.reason == NO_SOLVER


def test_config_rejects_unknown_judge():
    with pytest.raises(ValueError, match="judge.kind"):
        DistillConfig.model_validate({"model": "m", "corpus": "c", "judge": {"kind": "nope"}})


def test_openai_judge_rewrites_through_the_scorer_client():
    """A local OpenAI-compatible endpoint: the reply becomes the rewrite (`<think>` opened when the judge did not);
    a 4xx is not retried and names its reason."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from r1v.core.judges import rewriter_config
    from r1v.judges.rewriters import OpenAIRewriterConfig, make_rewriter

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if body["model"] == "bad":
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b"no such model")
                return
            reply = {"choices": [{"message": {"content": "2 + 2 = 4.\n</think>\nAnswer: \\boxed{4}"}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    row = {"id": "r", "answer": "4", "messages": [{"role": "user", "content": "What is 2 + 2?"},
                                                 {"role": "assistant", "content": "<think>\n2 + 2 = 5.\n</think>"}]}
    try:
        cfg = rewriter_config({"kind": "openai", "base_url": url, "model": "judge", "retries": 0})
        assert isinstance(cfg, OpenAIRewriterConfig)
        with make_rewriter(cfg) as rw:
            (out,) = rw.rewrite([row])
        assert out.text == "<think>\n2 + 2 = 4.\n</think>\nAnswer: \\boxed{4}"
        assert accuracy(out.text, {"answer": "4"}) == 1.0
        prompt = seen[0]["messages"][-1]["content"]
        assert "2 + 2 = 5." in prompt and "Reference answer: 4" in prompt  # the wrong chain and the truth
        with make_rewriter(rewriter_config({"kind": "openai", "base_url": url, "model": "bad"})) as rw:
            (fail,) = rw.rewrite([row])
        assert fail.text is None and fail.reason == "http_error" and len(seen) == 2
    finally:
        server.shutdown()
