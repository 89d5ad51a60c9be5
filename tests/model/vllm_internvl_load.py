"""Run as a script: `python vllm_internvl_load.py CHAT_DIR...`. Builds vLLM's own model class for each exported
InternVL-chat checkpoint (the one its `architectures` names: `InternVLChatModel` or `SkyworkR1VChatModel`), loads the
checkpoint's tensors with that class's `load_weights` (vLLM's name mapping, q/k/v and gate/up fusion, shape checks)
and prints, per directory, one JSON line: the class, the parameters no tensor filled, the tensors whose loaded value
differs from the file's. Nothing is run: no forward pass, no engine.

Two stand-ins, both outside what is checked:
- torchvision is not installed beside CPU torch; vLLM's InternVL processor imports it at module level but uses it
  only to preprocess images, so an empty module stands in (after transformers is imported, which then knows that
  torchvision is absent). vLLM inspects model classes in a subprocess, which would not have the stand-in: here the
  inspection runs in this process;
- vLLM has no config class for `model_type: internvl_chat`: the released checkpoints bring theirs as remote code
  (`configuration_internvl_chat.py`, `trust_remote_code`). `InternVLChatConfig` below builds what that code builds
  (vision_config with plain attributes, llm_config as the LLM's own config class).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import socket
import sys
import types
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, Qwen2Config  # noqa: E402

_tv = types.ModuleType("torchvision")
_tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
_tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
sys.modules.setdefault("torchvision", _tv)
sys.modules.setdefault("torchvision.transforms", _tv.transforms)  # type: ignore[attr-defined]


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config: dict | None = None, llm_config: dict | None = None, **kw) -> None:
        super().__init__(**kw)
        self.vision_config = PretrainedConfig(**(vision_config or {}))
        llm_config = llm_config or {"architectures": ["Qwen2ForCausalLM"]}
        arch = (llm_config.get("architectures") or ["Qwen2ForCausalLM"])[0]
        self.llm_config = (LlamaConfig if arch == "LlamaForCausalLM" else Qwen2Config)(**llm_config)


AutoConfig.register("internvl_chat", InternVLChatConfig, exist_ok=True)

from safetensors.torch import load_file  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.models import ModelRegistry, registry  # noqa: E402

registry._run_in_subprocess = lambda fn: fn()

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def expected(name: str, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What vLLM's parameter `name` should hold: the file's tensor, or the concatenation vLLM fuses it from."""
    if name in weights:
        return weights[name]
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            srcs = [weights.get(name.replace(fused, p)) for p in parts]
            return torch.cat(srcs) if all(s is not None for s in srcs) else None
    return None


def check(chat: Path, first: bool) -> dict:
    cfg = EngineArgs(model=str(chat), enforce_eager=True, dtype="float32", max_model_len=512).create_engine_config()
    cls, _ = ModelRegistry.resolve_model_cls(cfg.model_config.architectures, cfg.model_config)
    with set_current_vllm_config(cfg):
        if first:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(1, 1)
        model = cls(vllm_config=cfg, prefix="")
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(chat.glob("*.safetensors")):
            weights.update(load_file(f))
        loaded = set(model.load_weights(iter(weights.items())))
    params = dict(model.named_parameters())
    differ = [n for n, p in params.items()
              if (want := expected(n, weights)) is None or want.shape != p.shape or not torch.equal(want, p.data)]
    return {"dir": str(chat), "class": cls.__name__, "params": len(params), "tensors": len(weights),
            "not_loaded": sorted(set(params) - loaded), "differ": differ}


if __name__ == "__main__":
    for i, d in enumerate(sys.argv[1:]):
        print("RESULT " + json.dumps(check(Path(d), i == 0)), flush=True)
