"""cluster/: the KubeRay manifests validate against KubeRay's CRDs as strictly as `kubectl apply --validate=strict`,
and keep the properties that nothing on a cluster would check for us: the dashboard never open without Ray's token
authentication, no secret in a runtime_env (the dashboard displays those), pinned images, the shared volume and
MLflow address every run needs, and a Dockerfile that installs what CI tests (`-c constraints.txt`) plus the `gpu`
extra. No cluster, network or Docker is needed: a wrong manifest fails here instead of at `kubectl apply` time or,
worse, on 64 GPUs an hour into a run.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# The CRDs live beside the repository (shared/data/kuberay, KubeRay v1.7.0), not in it: from /work/main this is
# /work/shared/data/kuberay, and CI lays shared/ beside its clone the same way.
CRDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuberay"
RAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
SHARED_PVC, SHARED_MOUNT = "r1v-shared", "/shared"
AUTH_SECRET = "r1v-ray-auth"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS} (shared/data/kuberay "
                                "beside the repository): the CRD validation cannot run without them")


# ------------------------------------------------------------------------------------------------ loading
@functools.cache
def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in cluster/*.yaml, as (file:index, object). Shared: a test that changes one copies it."""
    out = []
    for f in sorted(CLUSTER.glob("*.yaml")):
        if f == RUNTIME_ENV:
            continue
        for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
            if doc is not None:
                out.append((f"{f.name}:{i}", doc))
    return out


def by_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, m) for n, m in manifests() if m.get("kind") == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [m for _, m in by_kind(kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} in cluster/, found {len(found)}"
    return found[0]


def strict(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema as a JSON Schema that rejects what the API server would.

    The API server prunes or (with --validate=strict) refuses unknown fields of a structural schema; JSON Schema
    allows them unless told otherwise, so every object with `properties` gets `additionalProperties: false`,
    except under `x-kubernetes-preserve-unknown-fields`, whose point is to keep them. `x-kubernetes-int-or-string`
    (ports, quantities) admits both types; `nullable` admits null. CEL rules (`x-kubernetes-validations`) are
    not evaluated here.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


_validators: dict[str, jsonschema.Draft7Validator] = {}


def validator(kind: str) -> jsonschema.Draft7Validator:
    if kind not in _validators:
        # The C loader when PyYAML has it: the three CRDs are 2 MB of YAML.
        crd = yaml.load((CRDS / RAY_KINDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        _validators[kind] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return _validators[kind]


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    """What the CRD refuses in a ray.io/v1 manifest, one line per error, with its path."""
    errs = []
    if manifest.get("apiVersion") != "ray.io/v1":
        errs.append(f"apiVersion {manifest.get('apiVersion')!r}, want 'ray.io/v1'")
    if not isinstance(manifest.get("metadata", {}).get("name"), str):
        errs.append("metadata.name missing")  # ObjectMeta is `type: object` in the CRD: checked here
    for e in validator(manifest["kind"]).iter_errors(manifest):
        errs.append(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
    return errs


# ------------------------------------------------------------------------------------------------ walking
def ray_cluster_specs(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayCluster specs a manifest creates (a RayJob with clusterSelector creates none)."""
    spec = m.get("spec", {})
    return {"RayCluster": [spec], "RayJob": [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else [],
            "RayService": [spec.get("rayClusterConfig", {})]}.get(m["kind"], [])


def ray_pod_specs(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


def pod_specs(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod spec in a manifest: Ray head and workers, a RayJob's submitter, a Deployment's."""
    pods = [p for c in ray_cluster_specs(m) for _, p in ray_pod_specs(c)]
    if m["kind"] == "RayJob" and "submitterPodTemplate" in m["spec"]:
        pods.append(m["spec"]["submitterPodTemplate"]["spec"])
    if m["kind"] == "Deployment":
        pods.append(m["spec"]["template"]["spec"])
    return pods


def containers(m: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for p in pod_specs(m) for c in p.get("initContainers", []) + p["containers"]]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def runtime_envs(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The runtime_envs a manifest hands to Ray: a RayJob's runtimeEnvYAML, each Serve application's."""
    out = []
    if m["kind"] == "RayJob" and "runtimeEnvYAML" in m["spec"]:
        out.append(yaml.safe_load(m["spec"]["runtimeEnvYAML"]) or {})
    if m["kind"] == "RayService" and "serveConfigV2" in m["spec"]:
        cfg = yaml.safe_load(m["spec"]["serveConfigV2"]) or {}
        out += [a.get("runtime_env") or {} for a in cfg.get("applications", [])]
    return out


# ------------------------------------------------------------------------------------------------ the rules
def looks_secret(name: str) -> bool:
    """An env var name that reads as a credential: a `_`-separated word ending in KEY, TOKEN, SECRET or PASSWORD
    (OPENAI_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, PGPASSWORD), not one merely containing it
    (TOKENIZERS_PARALLELISM)."""
    return any(w.endswith(("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD")) or w.startswith("CREDENTIAL")
               for w in name.upper().split("_"))


def token_auth(cluster: dict[str, Any]) -> bool:
    """Ray's token authentication is on for this cluster: KubeRay's authOptions, or the same by hand (every Ray
    container has RAY_AUTH_MODE=token and a token from a Secret or a file, never a literal)."""
    if cluster.get("authOptions", {}).get("mode") == "token":
        return True
    for _, pod in ray_pod_specs(cluster):
        for c in pod["containers"]:
            env = env_of(c)
            tok = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or not (tok or "RAY_AUTH_TOKEN_PATH" in env):
                return False
    return True


def dashboard_problems(m: dict[str, Any]) -> list[str]:
    """A dashboard that listens beyond loopback without token auth. KubeRay passes --dashboard-host=0.0.0.0 when
    rayStartParams do not set it, so an absent dashboard-host counts as 0.0.0.0."""
    out = []
    for c in ray_cluster_specs(m):
        host = str(c["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0"))
        if host not in LOOPBACK and not token_auth(c):
            out.append(f"{m['kind']} {m['metadata']['name']}: dashboard on {host} without token authentication")
    return out


def secret_problems(m: dict[str, Any]) -> list[str]:
    """Secrets where they would leak: any secret-looking name in a runtime_env (displayed by the dashboard, kept in
    job metadata), or a secret-looking pod env var with a literal value instead of a secretKeyRef."""
    out = [f"runtime_env env_vars {k}" for r in runtime_envs(m) for k in (r.get("env_vars") or {}) if looks_secret(k)]
    for c in containers(m):
        for name, e in env_of(c).items():
            if looks_secret(name) and "value" in e:
                out.append(f"container {c['name']} env {name} has a literal value")
    return out


def image_problems(m: dict[str, Any]) -> list[str]:
    out = []
    for c in containers(m):
        image = c.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and (not tag or tag == "latest"):
            out.append(f"container {c['name']}: image {image!r} is not pinned")
    return out


def load_cluster_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


# ------------------------------------------------------------------------------------------------ CRD validation
RAY_MANIFESTS = [(n, m) for n, m in manifests() if m.get("kind") in RAY_KINDS]


def test_cluster_holds_every_kind_of_manifest():
    kinds = {m.get("kind") for _, m in manifests()}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    for name, m in manifests():
        assert {"apiVersion", "kind", "metadata"} <= m.keys(), f"{name} is not a Kubernetes object"


@needs_crds
@pytest.mark.parametrize("name,manifest", RAY_MANIFESTS, ids=[n for n, _ in RAY_MANIFESTS])
def test_ray_manifest_validates_against_kuberay_crd(name, manifest):
    assert crd_errors(manifest) == [], name


@needs_crds
def test_validator_rejects_an_unknown_field():
    m = copy.deepcopy(one("RayCluster", "r1v"))
    m["spec"]["headGroupSpec"]["rayStartParms"] = {}  # a typo: kubectl --validate=strict refuses it
    assert any("rayStartParms" in e for e in crd_errors(m))
    m = copy.deepcopy(one("RayCluster", "r1v"))
    m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []  # deep in a PodSpec
    assert any("volumeMount" in e and "Additional properties" in e for e in crd_errors(m))


@needs_crds
def test_validator_rejects_a_wrong_type():
    m = copy.deepcopy(one("RayCluster", "r1v"))
    m["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert any(e.startswith("spec.workerGroupSpecs.0.replicas") and "not of type 'integer'" in e
               for e in crd_errors(m))
    m = copy.deepcopy(one("RayJob", "r1v-tiny"))
    m["spec"]["shutdownAfterJobFinishes"] = "false"
    assert any("shutdownAfterJobFinishes" in e for e in crd_errors(m))
    m = copy.deepcopy(one("RayCluster", "r1v"))
    m["spec"]["authOptions"]["mode"] = "tokens"  # an enum
    assert any("authOptions.mode" in e for e in crd_errors(m))


@needs_crds
def test_int_or_string_takes_both_and_nothing_else():
    m = copy.deepcopy(one("RayCluster", "r1v"))
    res = m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["cpu"] = 128  # an int quantity is as valid as "128"
    assert crd_errors(m) == []
    res["limits"]["cpu"] = "128 cores"  # a string still has to be a quantity
    assert any("limits.cpu" in e for e in crd_errors(m))
    res["limits"]["cpu"] = [128]
    assert any("limits.cpu" in e for e in crd_errors(m))


def test_strict_schema_keeps_preserve_unknown_fields_open():
    # The v1.7.0 CRDs have no such field, so this is checked on a schema of the same shape.
    schema = strict({"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "port": {"x-kubernetes-int-or-string": True},
        "when": {"type": "string", "nullable": True}}})
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"open": {"a": "x", "b": 1}, "port": 8265, "when": None})
    assert v.is_valid({"port": "dashboard"})
    assert not v.is_valid({"closed": {"a": "x", "b": 1}})
    assert not v.is_valid({"port": 1.5})
    assert not v.is_valid({"extra": 1})


# ------------------------------------------------------------------------------------------------ security
@pytest.mark.parametrize("name,manifest", RAY_MANIFESTS, ids=[n for n, _ in RAY_MANIFESTS])
def test_dashboard_is_never_open_without_token_auth(name, manifest):
    assert dashboard_problems(manifest) == []


def test_dashboard_check_catches_an_open_dashboard():
    m = copy.deepcopy(one("RayCluster", "r1v"))
    del m["spec"]["authOptions"]
    assert dashboard_problems(m)  # KubeRay's default host is 0.0.0.0
    m["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "127.0.0.1"
    assert dashboard_problems(m) == []
    m["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    for _, pod in ray_pod_specs(m["spec"]):
        for c in pod["containers"]:
            c.setdefault("env", []).append({"name": "RAY_AUTH_MODE", "value": "token"})
    assert dashboard_problems(m), "auth mode without a token is not auth"
    for _, pod in ray_pod_specs(m["spec"]):
        for c in pod["containers"]:
            c["env"].append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
    assert dashboard_problems(m) == []


def test_every_ray_cluster_shares_one_auth_secret_and_submitters_present_it():
    # One Secret for every cluster, so that the token the user holds (docs/cluster.md) opens each of them.
    for _, m in RAY_MANIFESTS:
        for c in ray_cluster_specs(m):
            assert c["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, m["metadata"]["name"]
    clusters = {m["metadata"]["name"] for _, m in by_kind("RayCluster")}
    for _, job in by_kind("RayJob"):
        selector = job["spec"].get("clusterSelector", {}).get("ray.io/cluster")
        assert selector is None or selector in clusters, f"{job['metadata']['name']} selects an unknown cluster"
        (sub,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"][:1]
        env = env_of(sub)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "auth_token"}
        assert job["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("name", ["HF_TOKEN", "OPENAI_API_KEY", "R1V_JUDGE_API_KEY", "AWS_SECRET_ACCESS_KEY",
                                  "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "GOOGLE_APPLICATION_CREDENTIALS"])
def test_secret_names_are_recognised(name):
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "R1V_BENCHMARKS", "HF_HUB_OFFLINE",
                                  "RAY_TRAIN_V2_ENABLED", "KEYBOARD"])
def test_ordinary_names_are_not_secrets(name):
    assert not looks_secret(name)


def test_no_secret_in_any_runtime_env_or_literal_env():
    for name, m in manifests():
        assert secret_problems(m) == [], name
    assert not [k for k in load_cluster_yaml("runtime_env.yaml").get("env_vars", {}) if looks_secret(k)]


def test_secret_check_catches_a_key_in_a_runtime_env():
    m = copy.deepcopy(one("RayJob", "r1v-tiny"))
    m["spec"]["runtimeEnvYAML"] += "  R1V_JUDGE_API_KEY: sk-123\n"
    assert secret_problems(m) == ["runtime_env env_vars R1V_JUDGE_API_KEY"]
    m = copy.deepcopy(one("RayService", "r1v-serve"))
    cfg = yaml.safe_load(m["spec"]["serveConfigV2"])
    cfg["applications"][0]["runtime_env"]["env_vars"]["HF_TOKEN"] = "hf_x"
    m["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert secret_problems(m) == ["runtime_env env_vars HF_TOKEN"]
    m = copy.deepcopy(one("RayCluster", "r1v"))
    m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0] = {"name": "R1V_JUDGE_API_KEY",
                                                                                 "value": "sk-123"}
    assert secret_problems(m) == ["container ray-head env R1V_JUDGE_API_KEY has a literal value"]


def test_images_are_pinned_and_all_the_same_release():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, m in manifests():
        assert image_problems(m) == [], name
        for c in containers(m):
            assert c["image"].rsplit("/", 1)[-1] == f"r1v:{version}", f"{name}: {c['image']}"


def test_image_check_catches_latest_and_untagged():
    m = copy.deepcopy(one("RayCluster", "r1v"))
    m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = "r1v:latest"
    m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "registry:5000/r1v"
    assert len(image_problems(m)) == 2
    m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "r/r1v@sha256:" + "0" * 64
    assert len(image_problems(m)) == 1


def test_pods_run_as_non_root():
    for name, m in manifests():
        for pod in pod_specs(m):
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["runAsUser"] != 0, name


# ------------------------------------------------------------------------------------------------ what runs need
def test_ray_pods_mount_the_shared_volume_and_shm_with_requests_and_limits():
    pvc = one("PersistentVolumeClaim", SHARED_PVC)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # head and every worker write run dirs and checkpoints
    for _, m in RAY_MANIFESTS:
        for c in ray_cluster_specs(m):
            for group, pod in ray_pod_specs(c):
                where = f"{m['metadata']['name']}/{group}"
                vols = {v["name"]: v for v in pod["volumes"]}
                (ray,) = pod["containers"][:1]
                mounts = {v["mountPath"]: v["name"] for v in ray["volumeMounts"]}
                assert vols[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == SHARED_PVC, where
                res = ray["resources"]
                # Ray sizes a node from its limits; requests below them would overcommit the node.
                assert res["requests"] == res["limits"] and {"cpu", "memory"} <= res["limits"].keys(), where
                if "nvidia.com/gpu" in res["limits"]:
                    assert str(res["limits"]["nvidia.com/gpu"]) == "8", where  # whole 8-GPU nodes
                    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where  # NCCL, vLLM TP


def test_every_ray_cluster_has_a_gpu_worker_group():
    for _, m in RAY_MANIFESTS:
        for c in ray_cluster_specs(m):
            gpus = [g for g in c["workerGroupSpecs"]
                    if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
            assert gpus, m["metadata"]["name"]


def test_38b_job_has_64_gpus_and_the_host_memory_the_planner_counts():
    c = one("RayJob", "r1v-38b")["spec"]["rayClusterSpec"]
    (g,) = c["workerGroupSpecs"]
    assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 8  # `r1v plan ... --gpus 64`
    mem = g["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    # `r1v plan`: each training worker loads the model in float32 (153.6 GB), 8 workers per node.
    assert mem.endswith("Gi") and int(mem[:-2]) * 2**30 >= 8 * 153.6e9
    head = c["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert int(head[:-2]) * 2**30 >= 153.6e9  # the driver builds the VLM in float32


def mlflow_address() -> str:
    svc = one("Service", "r1v-mlflow")
    (port,) = svc["spec"]["ports"]
    return f"http://{svc['metadata']['name']}:{port['port']}"


def entrypoint(job: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """(workflow in the repository, overrides, options) of a RayJob's `r1v run` entrypoint."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["r1v", "run"], argv
    assert argv[2].startswith("/opt/r1v/"), "the workflow as installed in the image (cluster/Dockerfile's WORKDIR)"
    rest = argv[3:]
    options = [a for i, a in enumerate(rest) if a.startswith("--") or (i and rest[i - 1].startswith("--"))]
    return argv[2].removeprefix("/opt/r1v/"), [a for a in rest if a not in options], options


@pytest.mark.parametrize("job", ["r1v-tiny", "r1v-38b"])
def test_rayjob_runs_on_the_shared_volume_and_reports_to_the_mlflow_server(job):
    from r1v.workflow.schema import load_workflow

    workflow, overrides, _ = entrypoint(one("RayJob", job))
    assert (ROOT / workflow).is_file()
    wf = load_workflow(ROOT / workflow, overrides)  # every override names a real field of that workflow
    assert wf.config.run_root.startswith(SHARED_MOUNT + "/")
    assert wf.config.tracking.tracking_uri == mlflow_address()


def test_38b_job_sets_every_placeholder_of_its_workflow():
    # The workflow's header comment lists the overrides a real run needs (each PLACEHOLDER path and endpoint).
    # Those are the `#     stages.X=...` lines of its `r1v run` example (other lines show optional overrides).
    head = (ROOT / "workflows/r1v-38b.yaml").read_text().split("\nname:")[0]
    needed = set(re.findall(r"^#\s+(stages\.[\w.]+)=\S+ \\$", head, re.M))
    workflow, overrides, options = entrypoint(one("RayJob", "r1v-38b"))
    assert workflow == "workflows/r1v-38b.yaml"
    assert needed and needed <= {o.split("=")[0] for o in overrides}
    assert options == ["--run-dir", "/shared/runs/r1v-38b"]  # a fixed directory, so the resume command is known


def test_rayservice_names_the_r1v_application():
    cfg = yaml.safe_load(one("RayService", "r1v-serve")["spec"]["serveConfigV2"])
    (app,) = cfg["applications"]
    assert app["name"] == "r1v" and app["import_path"] == "r1v.serve.app:build"


def test_mlflow_server_serves_artifacts_from_the_shared_volume():
    dep = one("Deployment", "r1v-mlflow")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"  # SQLite: one writer
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    svc = one("Service", "r1v-mlflow")
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"  # no auth on MLflow: never outside the cluster
    (c,) = spec["template"]["spec"]["containers"]
    args = c["command"]
    assert args[:2] == ["mlflow", "server"] and "--serve-artifacts" in args and "--host=0.0.0.0" in args
    assert f"--artifacts-destination={SHARED_MOUNT}/mlartifacts" in args
    assert f"--port={svc['spec']['ports'][0]['port']}" in args
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert f"{mlflow_address().removeprefix('http://')}" in hosts  # the Host header the Ray pods send
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: claims[m["name"]] for m in c["volumeMounts"]}
    assert mounts[SHARED_MOUNT] == SHARED_PVC
    db = next(a for a in args if a.startswith("--backend-store-uri=")).split("=", 1)[1]
    if db.startswith("sqlite:"):
        # SQLite's locking is unreliable on NFS-like volumes: its file sits on a volume of its own (ReadWriteOnce).
        (mount,) = [p for p in mounts if db.startswith(f"sqlite:///{p}/")]
        assert mounts[mount] != SHARED_PVC
        assert one("PersistentVolumeClaim", mounts[mount])["spec"]["accessModes"] == ["ReadWriteOnce"]
    else:
        assert db.startswith("postgresql"), db
    assert {p["containerPort"] for p in c["ports"]} == {5000}


# ------------------------------------------------------------------------------------------------ image and env
DOCKERFILE = CLUSTER / "Dockerfile"


def dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines()
                                          if not ln.lstrip().startswith("#")))
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def test_dockerfile_base_image_is_pinned_cuda():
    lines = dockerfile_lines()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    (base,) = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    base = re.sub(r"\$\{(\w+)\}", lambda g: args[g[1]], base)
    repo, _, tag = base.partition("@")[0].rpartition(":")
    assert repo == "nvidia/cuda" and tag and tag != "latest", base
    # torch 2.14.0 (vllm 0.33's pin) is a CUDA 13.0 build on PyPI: an older CUDA userland cannot run it.
    assert tag.startswith("13.0"), tag


def test_dockerfile_installs_what_ci_tests_plus_the_gpu_extra():
    lines = dockerfile_lines()
    joined = "\n".join(lines)
    installs = [c for ln in lines if ln.startswith("RUN ") for c in ln[4:].split("&&") if "pip install" in c]
    (main,) = [c for c in installs if "-e" in c.split()]
    words = shlex.split(main)
    assert '.[gpu]' in words, main
    cfile = words[words.index("-c") + 1]
    # constraints.txt as such, or a copy derived from it (only the torch pin replaced: see the Dockerfile).
    assert cfile == "constraints.txt" or re.search(rf"constraints\.txt > {re.escape(cfile)}", joined), cfile
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_for_vllm = re.search(r"vllm \S+ pins torch (\S+?)\)", pyproject)[1]
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_for_vllm)}$", joined, re.M)
    assert "pip install torch==${TORCH_VERSION}" in joined
    # The derived file differs from constraints.txt in the torch line alone.
    assert 'sed "s/^torch==.*/torch==${TORCH_VERSION}/" constraints.txt >' in joined


def test_dockerfile_runs_offline_as_non_root():
    lines = dockerfile_lines()
    env = " ".join(ln for ln in lines if ln.startswith("ENV "))
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    # The manifests' securityContext expects that uid.
    assert user[-1].split(":")[0] == str(one("RayCluster", "r1v")["spec"]["headGroupSpec"]["template"]["spec"]
                                         ["securityContext"]["runAsUser"])
    assert "wget" in " ".join(ln for ln in lines if ln.startswith("RUN "))  # KubeRay's default probes use it
    assert any(ln.startswith("WORKDIR /opt/r1v") for ln in lines)  # where the RayJobs' workflows are


def test_dockerignore_keeps_runs_venvs_checkpoints_and_history_out():
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    for pattern in [".git", ".venv", "runs", "mlruns", "**/*.safetensors", "**/checkpoints"]:
        assert pattern in ignore, pattern
    assert "!r1v/world/backbones/**/*.safetensors" in ignore  # the tiny workflow's shipped weights


def test_runtime_env_uploads_the_code_but_not_runs_venvs_or_checkpoints(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes  # the matcher `ray job submit` uploads with

    env = load_cluster_yaml("runtime_env.yaml")
    assert "pip" not in env and "conda" not in env  # everything is in the image: nothing installed at run time
    excluded = _get_excludes(tmp_path, env["excludes"])
    for p in [".venv/bin/python", "runs/tiny-1/run.json", "mlruns/0/meta.yaml", ".git/config",
              "exports/model.safetensors", "runs/x/checkpoint_000001/model.pt"]:
        assert excluded(tmp_path / p), p
    for p in ["r1v/cli/app.py", "workflows/tiny.yaml", "r1v/world/backbones/vision_tower/model.safetensors"]:
        assert not excluded(tmp_path / p), p
