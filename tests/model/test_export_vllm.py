"""`r1v export --layout internvl-chat` output against what vLLM reads: vLLM's own `InternVLChatModel` and
`SkyworkR1VChatModel` classes are built for the exported checkpoints and load them with their `load_weights`, in a
subprocess (`vllm_internvl_load.py`, which says what stands in for torchvision and for the checkpoints' remote config
code). Every vLLM parameter must be filled, each with the file's values (or their q/k/v, gate/up concatenation).
Nothing is run. Skipped without vLLM."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert import _perturb, _skywork_like_vlm

from r1v.model import save_model
from r1v.model.convert import to_internvl_chat

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def test_vllm_internvl_and_skywork_classes_load_every_exported_tensor(vlm, spec, tokenizer, tmp_path: Path) -> None:
    # InternViT-300M flavour (layer norms) as InternVLChatModel; InternViT-6B flavour (RMS norms, q/k norms, qkv
    # bias, as Skywork-R1V-38B) as SkyworkR1VChatModel
    internvl = to_internvl_chat(save_model(_perturb(vlm), tokenizer, tmp_path / "hf1"), tmp_path / "internvl",
                                variant="internvl")
    skywork = to_internvl_chat(save_model(_perturb(_skywork_like_vlm(spec, tokenizer)), tokenizer, tmp_path / "hf2"),
                               tmp_path / "skywork", variant="skywork")
    script = Path(__file__).with_name("vllm_internvl_load.py")
    out = subprocess.run([sys.executable, str(script), str(internvl), str(skywork)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    results = [json.loads(line.removeprefix("RESULT ")) for line in out.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert out.returncode == 0 and len(results) == 2, (out.stdout[-3000:], out.stderr[-3000:])
    assert [r["class"] for r in results] == ["InternVLChatModel", "SkyworkR1VChatModel"]
    for r in results:
        assert r["params"] > 0 and r["not_loaded"] == [] and r["differ"] == [], r
