"""The tiny R1V workflow (the recipe on the miniature world) submitted to the head + two workers cluster
(127.0.0.1) with `r1v submit --follow`, MLflow on a tracking server: with the run root on a path every node sees,
and (second test, shrunk) in an S3-compatible store.

The first checks what a user relies on: every stage finished with an MLflow child run holding metrics, the broken
rows were quarantined and counted, only the projector moved (vision and LLM weights bit-identical), and the
results table reconciles with MLflow and shows each stage's effect in the order the recipe promises (the
ordering, not exact values: a bug in masking, tiling, packing, the projector swap or the GRPO loss shows up
as a missing gain).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from cluster.conftest import r1v
from cluster.test_failures import _run_dir
from r1v.core import storage
from r1v.workflow.runner import Runner

ROOT = Path(__file__).resolve().parent.parent.parent
TINY = ROOT / "workflows" / "tiny.yaml"
# what runs model code: Ray Train's workers and the engine actors (rollouts, evals, generation)
ACTORS = ("RayTrainWorker", "EngineHost", "EvalEngineHost")


def placement(local_cluster, job_id: str) -> dict[str, set[str]]:
    """The classes of the job's model-running actors by the kind of node they ran on ("head" or "worker")."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    nodes = {n.node_id: n.resources_total for n in list_nodes(address=local_cluster.dashboard, detail=True)}
    ray_job = JobSubmissionClient(local_cluster.dashboard).get_job_info(job_id).job_id
    out: dict[str, set[str]] = {"head": set(), "worker": set()}
    for a in list_actors(address=local_cluster.dashboard, detail=True, limit=10_000,
                         filters=[("job_id", "=", ray_job)]):
        if a.class_name in ACTORS:
            out["head" if "head" in nodes[a.node_id] else "worker"].add(a.class_name)
    return out


def params_by_group(model_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    from r1v.model.freeze import param_group_of
    from r1v.model.io import load_model

    model, _ = load_model(model_dir)
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "llm": {}}
    for name, p in model.named_parameters():
        out[param_group_of(name)][name] = p.detach().clone()
    return out


def assert_projector_only(before: str, after: str) -> None:
    a, b = params_by_group(before), params_by_group(after)
    for group in ("vision", "llm"):
        assert a[group].keys() == b[group].keys()
        changed = [n for n in a[group] if not torch.equal(a[group][n], b[group][n])]
        assert not changed, f"{group} weights changed: {changed[:3]}"
    assert any(not torch.equal(a["projector"][n], b["projector"][n]) for n in a["projector"]), \
        "the projector did not change"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~8 min alone; sharing the 2 cores with the other xdist workers, up to half as fast
def test_the_demo_submitted_to_the_cluster(local_cluster, tracking_server, tmp_path):
    # The demo as shipped but for GRPO's length (5 steps, not 30), one iterative-SFT round of three (how a round
    # chains from the one before is tests/test_repeat.py's, selection's arithmetic tests/score's), the alignment
    # corpus (3,000 rows, not 6,000) and a held-out test of 300 items (not 1,000), to keep the suite within its
    # budget (this test is its longest path): the effects are measured at full size by bench/world_recipe.py.
    # With seed 0 and these sizes (one run, n = 300): SFT 0.170, the round 0.157, GRPO 0.217 against no_image 0.033,
    # and SFT against re-assembly's 0.067: margins of 0.12 and 0.10 in accuracy, about 5 and 4 standard errors.
    # Of the five baselines it runs the two its assertions read (no_image, text_reasoning): the others are evals of
    # the same kind on other models, which the object-store test and bench/world_recipe.py run.
    n_test = 300
    from r1v.workflow.schema import load_workflow

    sizes = ["stages.grpo.config.steps=5", "stages.round.repeat.over.tau=[3]",
             "stages.round.repeat.over.lr=[1.0e-3]", "stages.data.config.n_align=3000",
             f"stages.data.config.n_test={n_test}"]
    skipped = ("shuffled_image", "substitute_vlm", "text_instruct")
    stages = [s for s in load_workflow(TINY, sizes).config.stages if s not in skipped]
    res = r1v("submit", str(TINY), f"tracking.tracking_uri={tracking_server.uri}", *sizes,
              "--run-root", str(tmp_path / "shared"), "--address", local_cluster.dashboard, "--follow",
              "--only", *stages, timeout=1700)
    out = res.stdout
    assert res.returncode == 0, (out + res.stderr)[-6000:]
    run_dir = _run_dir(out)
    runner = Runner.open(run_dir)
    # trainers, rollout engines and eval engines all ran, and only on the worker nodes (the driver on the head)
    assert placement(local_cluster, runner.meta["job"]["id"]) == {"head": set(), "worker": set(ACTORS)}
    outputs = {s: runner.state(s)["outputs"] for s in stages}

    client = MlflowClient(runner.meta["tracking_uri"])
    parent = client.get_run(runner.meta["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = {c.info.run_name: c for c in client.search_runs(
        [runner.meta["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == set(stages)
    assert all(c.info.status == "FINISHED" and c.data.metrics for c in children.values())
    assert {"loss", "lr", "tokens_per_s", "rows_quarantined"} <= set(children["align"].data.metrics)
    assert {"reward", "accuracy", "response_length", "kl", "clip_frac"} <= set(children["grpo"].data.metrics)
    assert children["sft"].data.params["optim.lr"] == "0.001"  # the resolved stage config is logged

    # the broken alignment rows were quarantined and counted, every other row trained on
    n_align = runner.wf.stage_configs["data"].n_align
    counts = json.loads((run_dir / "stages" / "align" / "epoch-0-counts.json").read_text())
    assert counts == {"epoch": 0, "rows_in": n_align, "rows_distinct": n_align, "rows_trained": n_align - 2,
                      "rows_quarantined": 2, "quarantined_by_reason": {"image_decode": 2}}
    import pyarrow.parquet as pq

    q = pq.read_table(run_dir / "stages" / "align" / "quarantine" / "epoch-0.parquet").to_pylist()
    assert len(q) == 2 and all(r["reason"] == "image_decode" and r["detail"] for r in q)

    assert_projector_only(outputs["models"]["model"], outputs["align"]["model"])
    assert_projector_only(outputs["reassemble"]["model"], outputs["sft"]["model"])
    assert_projector_only(outputs["sft"]["model"], outputs["round1_sft"]["model"])
    assert_projector_only(outputs["round1_sft"]["model"], outputs["grpo"]["model"])
    # re-assembly kept the aligned projector and took the reasoning LLM
    aligned, reassembled = params_by_group(outputs["align"]["model"]), params_by_group(
        outputs["reassemble"]["model"])
    assert all(torch.equal(aligned["projector"][n], reassembled["projector"][n]) for n in aligned["projector"])
    from r1v.model.io import load_llm

    llm, _ = load_llm(outputs["models"]["llm"])
    llm_params = dict(llm.named_parameters())
    lm_head = next(n for n in reassembled["llm"] if n.endswith("lm_head.weight"))
    assert torch.equal(reassembled["llm"][lm_head], llm_params["lm_head.weight"])

    # the results table: printed, written, logged to the parent run, and in the order the recipe promises
    results = json.loads((run_dir / "results.json").read_text())
    assert "baseline: text_reasoning" in out and "reassemble" in out
    rows = {r["stage"]: r for r in results["stages"]}
    rounds = ["round1_sft"]
    assert list(rows) == ["reassemble", "sft", *rounds, "grpo"]
    base = results["baselines"]
    assert set(base) == {"no_image", "text_reasoning"}
    for r in [*rows.values(), *base.values()]:
        assert r["n"] == n_test and 0 <= r["accuracy"] <= 1 and r["stderr"] > 0 and r["mean_response_tokens"] > 0
    metrics = client.get_run(parent.info.run_id).data.metrics  # logged after the run finished
    for name, r in rows.items():
        for k in ("accuracy", "stderr", "pass_at_1", "mean_response_tokens"):
            assert metrics[f"results/{name}/{k}"] == pytest.approx(r[k])
    for name, r in base.items():
        assert metrics[f"results/baseline/{name}/accuracy"] == pytest.approx(r["accuracy"])
    # iterative SFT: the round's corpus ({rm >= tau} U the previous model's errors) and accuracy are logged; the
    # row's corpus is the one its select stage wrote and counted
    for t, name in enumerate(rounds, start=1):
        counts = json.loads((run_dir / "stages" / f"round{t}_select" / "counts.json").read_text())
        sel = children[f"round{t}_select"].data.metrics
        assert rows[name]["corpus_rows"] == counts["rows_out"] == sel["rows_out"]
        assert metrics[f"results/{name}/corpus_rows"] == counts["rows_out"]
        assert rows[name]["corpus_by_score"] + rows[name]["corpus_as_errors"] == counts["rows_out"]
        assert rows[name]["corpus_as_errors"] > 0  # the previous model got some of D wrong
        assert sel["tau"] == t + 2 and "accuracy" in children[f"round{t}_eval"].data.metrics
        assert 0 < rows[name]["corpus_by_score"] < runner.wf.stage_configs["data"].n_sft  # tau 3 drops some rows
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.json", "results/results.png"} <= arts
    acc = {k: v["accuracy"] for k, v in rows.items()} | {k: v["accuracy"] for k, v in base.items()}
    # A smoke check, guaranteed by the shipped world when the evals work: text (the digits written out) is a ceiling
    # for every visual score. It fails only when an eval mode is broken (the wrong model, images where text should
    # be), not when the recipe is.
    assert all(acc["text_reasoning"] > acc[k] for k in ("reassemble", "sft", *rounds, "grpo", "no_image"))
    # What the recipe must deliver and can fail to (docs/world.md): image information reaching the answers once the
    # projector has been trained on the reasoning LLM (a masking, tiling or projector bug blinds it), and SFT beating
    # re-assembly (by 2.9 to 8.3 standard errors over seeds 0-2 in bench/world_recipe.py). GRPO over SFT and
    # re-assembly over both baselines are measured there and not yet met on every seed, so they are not asserted.
    assert min(acc["sft"], *(acc[r] for r in rounds), acc["grpo"]) > acc["no_image"]
    assert acc["sft"] > acc["reassemble"]

    st = r1v("status", str(run_dir))
    assert st.returncode == 0 and "eval_grpo        eval             done" in st.stdout, st.stdout + st.stderr
    assert "SUCCEEDED" in st.stdout

    # the run-inspection notebook executes against this run and draws its curves
    nb = nbformat.read(ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    os.environ["R1V_RUN"] = str(run_dir)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
        # the quickstart: the results, then the final model served by `r1v serve` and asked an image question
        quick = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
        NotebookClient(quick, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("R1V_RUN", None)
    assert (run_dir / "curves.png").stat().st_size > 0
    printed = "".join(o.get("text", "") for c in quick.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"r1v serve: model '{run_dir.name}' on http://127.0.0.1:" in printed, printed[-2000:]
    answer = next(ln for ln in printed.splitlines() if ln.startswith("answer:"))
    assert len(answer.split(":", 1)[1].strip()) > 0 and "r1v serve exited with 0" in printed, printed[-2000:]


# The demo's shape (every stage kind, one round of three, the results table) at toy sizes: what it checks is that
# each stage kind reads its inputs from the store and writes its outputs there, not what the models learn. The
# alignment stage (an SFT stage, as `sft` is) is left out: re-assembly takes the substitute's untrained projector.
SHRUNK = ["stages.round.repeat.over.tau=[3]", "stages.round.repeat.over.lr=[1.0e-3]",
          "stages.reassemble.config.model=@models.model", "stages.data.config.n_align=8",
          "stages.data.config.n_sft=96", "stages.data.config.n_grpo=32",
          "stages.data.config.n_test=40", "stages.sft.config.max_steps=6",
          "stages.round.repeat.stages.sft.config.max_steps=3", "stages.grpo.config.steps=2",
          "stages.grpo.config.prompts_per_step=4", "stages.grpo.config.dynamic_sampling.enabled=false",
          # Stage 1 SFT uploads the checkpoints of two ranks; the round's SFT and GRPO train on one (a process each
          # fewer: what they add here is their stage kind's reads and writes, not another rank's)
          "stages.round.repeat.stages.sft.config.trainer.num_workers=1", "stages.grpo.config.trainer.num_workers=1"]
SKIPPED = ("align", "no_image", "shuffled_image", "substitute_vlm", "text_instruct")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_demo_submitted_with_its_run_root_in_an_object_store(local_cluster, cluster_s3, tracking_server,
                                                                 tmp_path, monkeypatch):
    """`r1v submit --run-root s3://...`: the nodes take the store's credentials from their own environment (the
    job's runtime_env carries none); trainers upload their models and checkpoints, engines and evals load from it.
    Two stages are held back and resumed by a second job after the driver node's copy of the run (its mirror) is
    deleted: the run's state and records come back from the store. `status` and the results are read back from the
    store alone, and no record holds the credentials."""
    for k, v in cluster_s3.env.items():  # this machine reads the store too (status), as a user's laptop would
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("R1V_CACHE", str(tmp_path / "laptop-cache"))
    root = cluster_s3.create_bucket("cluster-runs") + "/r1v"
    # every stage kind, but of the five baselines only the one that loads an LLM alone from the store (the others
    # evaluate as the stage evals do), and no alignment stage (above)
    from r1v.workflow.schema import load_workflow

    stages = [s for s in load_workflow(TINY, SHRUNK).config.stages if s not in SKIPPED]
    held = ["eval_grpo", "text_reasoning"]  # an eval of a trained VLM and one of an LLM alone, for the resume
    res = r1v("submit", str(TINY), f"tracking.tracking_uri={tracking_server.uri}", *SHRUNK, "--run-root", root,
              "--address", local_cluster.dashboard, "--follow", "--only", *(s for s in stages if s not in held),
              timeout=1400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    uri = next(line.split(" ", 2)[2] for line in res.stdout.splitlines() if line.startswith("r1v: run "))
    assert uri.startswith(root + "/tiny-")
    # the driver's node never held a model the trainers exported: they uploaded it
    head_mirror = local_cluster.root / "cache" / "head" / "runs" / "s3" / uri.removeprefix("s3://")
    assert (head_mirror / "run.json").exists() and not (head_mirror / "stages" / "sft" / "model").exists()
    shutil.rmtree(head_mirror)  # the next driver finds the run's state in the store only
    res = r1v("resume", uri, "--address", local_cluster.dashboard, "--follow", "--only", *held, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    assert (head_mirror / "run.json").exists()  # rebuilt from the store

    st = r1v("status", uri)
    assert st.returncode == 0, st.stderr[-2000:]
    wf_stages = Runner.open(uri).wf.config.stages
    rows = {ln.split()[0]: ln.split()[2] for ln in st.stdout.splitlines() if ln.split()[:1] and
            ln.split()[0] in wf_stages}
    assert rows == {s: "pending" if s in SKIPPED else "done" for s in wf_stages} and "SUCCEEDED" in st.stdout, \
        st.stdout
    results = storage.read_json(f"{uri}/results.json")
    assert [r["stage"] for r in results["stages"]] == ["reassemble", "sft", "round1_sft", "grpo"]
    assert list(results["baselines"]) == ["text_reasoning"]
    assert all(r["n"] == 40 for r in [*results["stages"], *results["baselines"].values()])
    for stage in ("sft", "grpo"):
        state = storage.read_json(f"{uri}/stages/{stage}/state.json")
        assert state["outputs"]["model"] == f"{uri}/stages/{stage}/model"
        files = storage.list_files(f"{uri}/stages/{stage}")
        assert "model/.r1v-manifest.json" in files and any(f.startswith("ray/train/") for f in files), files
    counts = storage.read_json(f"{uri}/stages/sft/epoch-0-counts.json")  # 6 steps: part of the epoch
    assert counts["rows_in"] > 0 and counts["rows_trained"] + counts["rows_quarantined"] == counts["rows_in"]
    progress = storage.read_json(f"{uri}/stages/sft/progress.json")  # rank 0's, into the store (docs/watching.md)
    assert progress["step"] == progress["total"] and "loss" in progress["metrics"]
    meta = storage.read_json(f"{uri}/run.json")
    assert len(meta["jobs"]) == 2
    placed = [placement(local_cluster, job) for job in meta["jobs"]]
    assert placed[0] == {"head": set(), "worker": set(ACTORS)} and placed[1] == {"head": set(),
                                                                                  "worker": {"EvalEngineHost"}}

    # the credentials reached no record: not the jobs' runtime_env, not the store's objects, not MLflow's params
    from ray.job_submission import JobSubmissionClient

    secret = cluster_s3.env["AWS_SECRET_ACCESS_KEY"]
    for job in meta["jobs"]:
        assert secret not in str(JobSubmissionClient(local_cluster.dashboard).get_job_info(job).runtime_env)
    for rel in storage.list_files(uri):
        if not rel.endswith((".safetensors", ".parquet", ".pt", ".png", ".npy")):
            assert secret.encode() not in (storage.get_bytes(f"{uri}/{rel}") or b""), rel
    # MLflow on the tracking server: the parent run holds the results
    client = MlflowClient(tracking_server.uri)
    parent = client.get_run(meta["parent_run_id"])
    assert secret not in str(parent.data.params) and parent.data.tags["r1v.run_dir"] == uri
    assert parent.data.metrics["results/grpo/accuracy"] == pytest.approx(results["stages"][-1]["accuracy"])
