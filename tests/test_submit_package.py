"""What `r1v submit` uploads: the checkout as Ray packages it with r1v's excludes (Ray's own zip code, run here).
Run outputs, environments and checkpoints stay home; every file of the r1v package goes, the world's backbones
(safetensors, which the checkpoint excludes name) included: a job without them failed its `model.world` stage."""

from __future__ import annotations

import zipfile

from r1v.cli.submit import EXCLUDES, PACKAGE_DATA, _excluded, package_size, project_root


def test_the_package_holds_the_r1v_package_and_leaves_outputs_home(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    files = {"r1v/world/backbones/llm/model.safetensors": b"w" * 10, "r1v/core/x.py": b"x = 1",
             "r1v/__pycache__/x.cpython-311.pyc": b"c", "pyproject.toml": b"[project]", "runs/r/ckpt.pt": b"p",
             "models/big/model.safetensors": b"m", "data/c.parquet": b"d", ".venv/lib/y.py": b"y",
             ".r1v-submit/wf.yaml": b"name: x"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    out = tmp_path.parent / "pkg.zip"
    create_package(str(tmp_path), out, include_gitignore=True, excludes=EXCLUDES + PACKAGE_DATA)
    names = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    kept = {"r1v/world/backbones/llm/model.safetensors", "r1v/core/x.py", "pyproject.toml", ".r1v-submit/wf.yaml"}
    assert names == kept
    assert {rel for rel in files if not _excluded(rel)} == kept  # the size check counts what Ray uploads


def test_the_checkouts_package_holds_the_shipped_backbones():
    root = project_root()
    backbones = sorted(p.relative_to(root).as_posix() for p in (root / "r1v" / "world" / "backbones").rglob("*")
                       if p.is_file())
    assert backbones and not any(_excluded(rel) for rel in backbones)
    assert package_size(root)[0] < 100 * 2**20
