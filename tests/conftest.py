"""Shared fixtures: one real local Ray cluster per test session, tiny models and data built offline."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"

# Ray workers inherit the environment of the cluster the session starts: make the test reward plugin
# importable there (GRPO workers import `reward_modules` themselves).
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p)
sys.path.insert(0, str(PLUGINS))
# One Ray temp dir per xdist worker, for the clusters its tests' CLIs start (the session cluster has its own).
os.environ.setdefault("RAY_TMPDIR", f"/tmp/r1v-ray-tests-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, and a fit waits for polls as it starts, reports
# and ends: about 9 s of a 4-step SFT stage's 35 s alone. Every cluster the session starts inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each fit starts a preemption watcher (an actor process of its own, for nodes a cloud reclaims: about 1.2 CPU-s on
# these machines, a few minutes of the suite's CPU over its fits); no test node is preempted.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every Ray node and driver of the tests takes 127.0.0.1 as its address (r1v's own local clusters do already,
# `r1v.core.loopback`): a process that joins one of them must too, or Ray resolves 127.0.0.1 to the machine's
# interface address, where nothing listens.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray reports usage statistics to usage-stats.ray.io unless told not to: the tests' traffic stays on loopback.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _ray_token_auth() -> None:
    """Every Ray cluster and client of the session (local ones, the multi-node test cluster, CLI subprocesses)
    uses token authentication with the machine's token, decided before Ray is imported: Ray 2.60 turns it on for
    a new cluster, and a process whose clients read the mode before it was set sends no token (401s, refused GCS
    connections)."""
    import secrets

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    token = Path.home() / ".ray" / "auth_token"
    if "RAY_AUTH_TOKEN" not in os.environ and not token.exists():  # what Ray does for a machine's first cluster
        token.parent.mkdir(exist_ok=True)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)


_ray_token_auth()

from r1v_test_servers import (  # noqa: E402  (a module of PLUGINS)
    MlflowServer,
    S3Server,
    release_when_done,
    shared,
    shared_dir,
    start_session_cluster,
)


def pytest_configure(config):
    """The controller (or the only process, without xdist) makes the directory where the session's shared services
    are recorded (`r1v_test_servers.shared`); xdist workers, started after this, inherit it."""
    if not hasattr(config, "workerinput") and "R1V_TEST_SHARED" not in os.environ:
        # short: the multi-node cluster's unix sockets live under it, and their paths must fit in 107 bytes
        config._r1v_shared = os.environ["R1V_TEST_SHARED"] = tempfile.mkdtemp(prefix="r1vs-", dir="/tmp")


def pytest_unconfigure(config):
    d = getattr(config, "_r1v_shared", None)
    if d:
        from r1v_test_servers import stop_shared

        stop_shared(Path(d))
        shutil.rmtree(d, ignore_errors=True)
        os.environ.pop("R1V_TEST_SHARED", None)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray cluster (`plugins/session_cluster.py`: started as `r1v run` starts one), shared by
    the xdist workers, each a driver of its own; yields its GCS address."""
    import ray

    from r1v.cli.app import init_ray

    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    gcs = shared("ray", lambda: start_session_cluster(shared_dir() / "r"))["gcs"]
    init_ray(gcs, None)
    yield gcs
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny substitute VLM, a second tiny LLM, and a synthetic corpus with two broken rows."""
    from r1v.data.synthetic import generate
    from r1v.model.io import save_llm, save_model
    from r1v.model.tiny import TinySpec, build_tiny_llm, build_tiny_vlm
    from r1v.model.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    spec = TinySpec()
    tok = build_tiny_tokenizer()
    vlm, tok = build_tiny_vlm(spec, tokenizer=tok, seed=0)
    llm = build_tiny_llm(spec, tok, seed=1)
    data = generate(root / "data", n_train=24, n_test=8, seed=0, corrupt_rows=2)
    return {"model": str(save_model(vlm, tok, root / "vlm")), "llm": str(save_llm(llm, tok, root / "llm")),
            "train": str(data["train"]), "test": str(data["test"]), "root": root}


def pytest_collection_modifyitems(config, items):
    """The demo run first, then one quick test, then the other slow tests (a stable sort).

    Under `--dist worksteal` (pyproject.toml) the worker that starts the demo run (~9 min) keeps the test queued
    right after it, which no other worker can steal: that one must be quick (it was the killed-SFT test, ~3 min,
    run after the demo on the same worker: 12 min 28 s). The other slow tests start early on the other workers."""
    def rank(item) -> int:
        if "test_the_demo_submitted_to_the_cluster" in item.nodeid:  # ~9 min: the suite's longest test
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)
    if items and rank(items[0]) == 0:
        quick = next((i for i, it in enumerate(items) if rank(it) == 2 and not {"ray_cluster", "tiny_assets"}
                      & set(getattr(it, "fixturenames", ()))), None)
        if quick is not None:
            items.insert(1, items.pop(quick))


_cluster_users: set[str] = set()


def pytest_collection_finish(session):
    """The tests that use the multi-node cluster (the slow ones run first): it is stopped once they have all ended
    instead of idling (about 0.1 of a core) through the rest of the suite."""
    _cluster_users.update(it.nodeid for it in session.items if "local_cluster" in getattr(it, "fixturenames", ()))


def pytest_runtest_logfinish(nodeid, location):
    if "R1V_TEST_SHARED" in os.environ:
        release_when_done("cluster", _cluster_users, nodeid)


# Services every xdist worker of the session shares (started once, stopped by the controller at the end): one
# S3-compatible server and one MLflow tracking server. A test that stops or breaks its server starts its own.
@pytest.fixture(scope="session")
def cluster_s3():
    """The S3-compatible server (the multi-node cluster's nodes know it: their environment has its endpoint and
    credentials). Tests take a bucket of their own."""
    def start() -> dict:
        s = S3Server(shared_dir() / "s3").start()
        return {"pid": s.proc.pid, "group": True, "root": str(s.root), "port": s.port}

    info = shared("s3", start)
    return S3Server(Path(info["root"]), info["port"])


@pytest.fixture(scope="session")
def tracking_server():
    """An MLflow tracking server (`mlflow server --serve-artifacts`) on 127.0.0.1 shared by the tests."""
    def start() -> dict:
        s = MlflowServer(shared_dir() / "mlflow").start()
        return {"pid": s.proc.pid, "group": True, "root": str(s.root), "port": s.port}

    info = shared("mlflow", start)
    return MlflowServer(Path(info["root"]), info["port"])
