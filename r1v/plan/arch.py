"""Model architectures for `r1v plan`: sizes from a folder's config.json or a named preset, parameter counts,
activation bytes and FLOPs from formulas, and the workflow's optional `plan:` section.

Nothing here imports torch or builds a model: planning a 38B run reads a few JSON files at most. The formulas
follow transformers' `InternVLForConditionalGeneration` (InternViT-style `vision_tower`, `multi_modal_projector`,
Qwen2-family `language_model` + `lm_head`) parameter by parameter; `tests/test_plan.py` checks them against
`sum(p.numel())` of an instantiated tiny model and against torch's saved-tensor hooks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class VisionArch:
    """An InternViT-style tower (transformers' `InternVLVisionModel`, or the InternVL-chat `InternVisionModel`).

    Parameters (h hidden, i intermediate, L layers, p patch, C channels, n = (image/p)^2 patches):
      embeddings  C*p^2*h + h (patch conv) + h (CLS) [+ h mask token] [+ (n+1)*h absolute positions]
      per layer   3*h^2 [+ 3h qkv bias] + h^2 + h (output proj) [+ 2h q/k RMSNorm] + 2*h*i + i + h (MLP)
                  + 2h (RMSNorm) or 4h (LayerNorm) + 2h (layer scale lambda_1, lambda_2)
      final norm  2h unless mean pooling (InternViT: none)
    """

    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int = 448
    patch_size: int = 14
    channels: int = 3
    qkv_bias: bool = False
    qk_norm: bool = False
    norm: Literal["rms_norm", "layer_norm"] = "layer_norm"
    final_norm: bool = False
    mask_token: bool = False
    abs_pos: bool = True

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def _norm(self) -> int:
        return self.hidden if self.norm == "rms_norm" else 2 * self.hidden

    def _modules(self) -> dict[str, int]:
        """Direct parameters of each kind of module (DeepSpeed's unit for its "largest layer")."""
        h, i = self.hidden, self.intermediate
        return {
            "embeddings": h * (1 + self.mask_token + (self.patches + 1) * self.abs_pos),
            "patch_conv": self.channels * self.patch_size**2 * h + h,
            "qkv": h * h + h * self.qkv_bias,
            "proj": h * h + h,
            "qk_norm": h if self.qk_norm else 0,
            "fc1": h * i + i,
            "fc2": i * h + h,
            "layer_norm": self._norm(),
            "layer_scale": 2 * h,
        }

    def params(self) -> int:
        m = self._modules()
        per_layer = 3 * m["qkv"] + m["proj"] + 2 * m["qk_norm"] + m["fc1"] + m["fc2"] + 2 * m["layer_norm"]
        per_layer += m["layer_scale"]
        return m["embeddings"] + m["patch_conv"] + self.layers * per_layer + 2 * self.hidden * self.final_norm

    def largest_module(self) -> int:
        return max(self._modules().values())

    def tokens_per_tile(self) -> int:
        return self.patches + 1  # CLS

    def forward_flops_per_tile(self) -> float:
        """2 FLOPs per parameter per token, plus bidirectional attention 4*t^2*h per layer (t tokens)."""
        t = self.tokens_per_tile()
        return 2.0 * self.params() * t + 4.0 * t * t * self.hidden * self.layers


@dataclass(frozen=True)
class LLMArch:
    """A Qwen2-family causal LM (`Qwen2ForCausalLM`; Llama-style when `qkv_bias` is off).

    Parameters (h hidden, i intermediate, L layers, V vocabulary, q = heads*head_dim, kv = kv_heads*head_dim):
      per layer   h*q + q (q_proj) + 2*(h*kv + kv) (k, v; biases only in Qwen2) + q*h (o_proj)
                  + 3*h*i (gate, up, down) + 2h (RMSNorms)
      embeddings  V*h;  lm_head  V*h unless tied;  final norm  h
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = True
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def _modules(self) -> dict[str, int]:
        h, i, b = self.hidden, self.intermediate, self.qkv_bias
        return {
            "embed": self.vocab * h,
            "lm_head": self.vocab * h,
            "q": h * self.q_dim + self.q_dim * b,
            "kv": h * self.kv_dim + self.kv_dim * b,
            "o": self.q_dim * h,
            "mlp": h * i,
            "norm": h,
        }

    def layer_params(self) -> int:
        m = self._modules()
        return m["q"] + 2 * m["kv"] + m["o"] + 3 * m["mlp"] + 2 * m["norm"]

    def params(self) -> int:
        m = self._modules()
        head = 0 if self.tie_embeddings else m["lm_head"]
        return m["embed"] + head + self.layers * self.layer_params() + m["norm"]

    def largest_module(self) -> int:
        return max(self._modules().values())

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache: keys and values of every layer."""
        return 2 * self.layers * self.kv_dim * dtype_bytes

    def act_bytes_per_token_layer(self, d: int, trainable: bool = False) -> int:
        """Bytes autograd keeps per token per decoder layer (SDPA/flash attention, so no s^2 scores).

        Frozen weights (the R1V case: gradients flow through the LLM to the projector, but no weight gradient is
        formed, so no GEMM input is kept): q, attention output, k, v in the activation dtype d:
        d*(2q + 2kv); the fp32 inputs of the two RMSNorms: 8h; SwiGLU's gate, SiLU(gate) and up: 3*d*i;
        fp32 per-token scalars (two rsqrt, log-sum-exp per head): 8 + 4*heads.
        Trainable weights add the GEMM inputs: d*(4h + i).
        Korthikanti et al.'s 34*h (+5*a*s) is for a GPT layer with trained weights, a 4h GELU MLP, dropout and
        materialised scores; measured here against torch's saved tensors instead (tests/test_plan.py).
        """
        h = self.hidden
        frozen = d * (2 * self.q_dim + 2 * self.kv_dim) + 8 * h + 3 * d * self.intermediate + 8 + 4 * self.heads
        return frozen + (d * (4 * h + self.intermediate) if trainable else 0)

    def act_bytes_per_token_fixed(self, d: int) -> int:
        """Outside the layers: the final RMSNorm's fp32 input and the RoPE cos/sin tables."""
        return 4 * self.hidden + 4 + 2 * d * self.hd

    def forward_flops_per_token(self, context: int) -> float:
        """2 FLOPs per GEMM parameter (all but the embedding table) plus causal attention 2*context*q per layer."""
        gemm = self.params() - self.vocab * self.hidden * (1 if not self.tie_embeddings else 0)
        return 2.0 * gemm + 2.0 * context * self.q_dim * self.layers


@dataclass(frozen=True)
class VLMArch:
    """InternVL: vision tower + projector + LLM.

    Projector (`multi_modal_projector`, InternVL's mlp1) with in = d_vision / downsample_ratio^2:
      LayerNorm(in) 2*in + Linear(in, h) in*h + h + Linear(h, h) h*h + h.
    At 38B (d_vision 3200, h 5120): 91.8M, the paper's "about 92M".
    """

    vision: VisionArch
    llm: LLMArch
    downsample_ratio: float = 0.5

    @property
    def projector_in(self) -> int:
        return self.vision.hidden * int(round(1 / self.downsample_ratio)) ** 2

    def _projector_modules(self) -> dict[str, int]:
        a, h = self.projector_in, self.llm.hidden
        return {"layer_norm": 2 * a, "linear_1": a * h + h, "linear_2": h * h + h}

    def groups(self) -> dict[str, int]:
        """Parameters per trainable group (r1v.model.freeze.GROUPS)."""
        return {
            "vision": self.vision.params(),
            "projector": sum(self._projector_modules().values()),
            "llm": self.llm.params(),
        }

    def params(self) -> int:
        return sum(self.groups().values())

    def largest_module(self) -> int:
        return max(self.vision.largest_module(), max(self._projector_modules().values()), self.llm.largest_module())

    def tokens_per_tile(self) -> int:
        """LLM tokens per tile after pixel shuffle (256 for 448px tiles, patch 14, ratio 0.5)."""
        return round(self.vision.patches * self.downsample_ratio**2)


Arch = VisionArch | LLMArch | VLMArch


# --------------------------------------------------------------------------- presets

_INTERNVIT_6B = VisionArch(
    hidden=3200, layers=45, heads=25, intermediate=12800, qkv_bias=False, qk_norm=True, norm="rms_norm"
)
_INTERNVIT_300M = VisionArch(
    hidden=1024, layers=24, heads=16, intermediate=4096, qkv_bias=True, qk_norm=False, norm="layer_norm"
)
_QWEN25_32B = LLMArch(hidden=5120, layers=64, heads=40, kv_heads=8, intermediate=27648, vocab=152064)
_QWEN2_1_5B = LLMArch(
    hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936, tie_embeddings=True
)

PRESETS: dict[str, Arch] = {
    # InternViT-6B as InternVL 1.5+ and Skywork-R1V ship it: 45 of the original 48 layers, 448px tiles.
    "InternViT-6B-448px-V1-5": _INTERNVIT_6B,
    "InternViT-6B-448px-V2_5": _INTERNVIT_6B,
    "InternViT-6B-448px": _INTERNVIT_6B,
    "InternViT-300M-448px": _INTERNVIT_300M,
    # Qwen2.5-32B and the models fine-tuned or distilled from it share one architecture.
    "Qwen2.5-32B": _QWEN25_32B,
    "Qwen2.5-32B-Instruct": _QWEN25_32B,
    "DeepSeek-R1-Distill-Qwen-32B": _QWEN25_32B,
    "QwQ-32B": _QWEN25_32B,
    "Qwen2-1.5B": _QWEN2_1_5B,
    "Qwen2.5-1.5B-Instruct": _QWEN2_1_5B,
    # The released 38B model: InternViT-6B + projector + DeepSeek-R1-Distill-Qwen-32B.
    "Skywork-R1V-38B": VLMArch(_INTERNVIT_6B, _QWEN25_32B),
}


# --------------------------------------------------------------------------- config.json


class ArchError(ValueError):
    """A config.json or preset r1v plan cannot turn into an architecture; the message names it."""


def _side(v: Any) -> int:
    return int(v[0] if isinstance(v, list | tuple) else v)


def vision_from_config(cfg: dict[str, Any]) -> VisionArch:
    """transformers' `internvl_vision` keys, or InternVL-chat's `intern_vit_6b` keys (qkv_bias, qk_normalization)."""
    try:
        return VisionArch(
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            intermediate=cfg["intermediate_size"],
            image_size=_side(cfg.get("image_size", 448)),
            patch_size=_side(cfg.get("patch_size", 14)),
            channels=cfg.get("num_channels", 3),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", False))),
            qk_norm=bool(cfg.get("use_qk_norm", cfg.get("qk_normalization", False))),
            norm=cfg.get("norm_type", "layer_norm"),
            final_norm="use_mean_pooling" in cfg and not cfg["use_mean_pooling"],
            mask_token=bool(cfg.get("use_mask_token", False)),
            abs_pos=bool(cfg.get("use_absolute_position_embeddings", True)),
        )
    except KeyError as e:
        raise ArchError(f"vision config has no {e.args[0]!r}") from None


def llm_from_config(cfg: dict[str, Any]) -> LLMArch:
    """Qwen2 (q/k/v biases) or a Llama-style config (`attention_bias`, default off)."""
    mt = cfg.get("model_type", "")
    if mt not in ("qwen2", "llama", "mistral"):
        raise ArchError(f"LLM model_type {mt!r} is not modelled (qwen2, llama, mistral are)")
    try:
        heads = cfg["num_attention_heads"]
        return LLMArch(
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else bool(cfg.get("attention_bias", False)),
            head_dim=cfg.get("head_dim"),
        )
    except KeyError as e:
        raise ArchError(f"LLM config has no {e.args[0]!r}") from None


def arch_from_config(cfg: dict[str, Any], vision_only: bool = False) -> Arch:
    """A VLM (transformers `internvl` or InternVL-chat layout), a vision tower, or a causal LM. `vision_only`:
    a VLM whose LLM is not modelled (InternLM2, ...) gives its vision tower, for stages that read only that."""
    if "vision_config" in cfg:
        vision = vision_from_config(cfg["vision_config"])
        text = cfg.get("text_config") or cfg.get("llm_config")
        try:
            if not isinstance(text, dict):
                raise ArchError("VLM config has no text_config / llm_config")
            return VLMArch(vision, llm_from_config(text), float(cfg.get("downsample_ratio", 0.5)))
        except ArchError:
            if vision_only:
                return vision
            raise
    mt = cfg.get("model_type", "")
    if mt in ("internvl_vision", "intern_vit_6b") or "InternVisionModel" in (cfg.get("architectures") or []):
        return vision_from_config(cfg)
    return llm_from_config(cfg)


def arch_from_dir(path: str | Path, vision_only: bool = False) -> Arch | None:
    """The architecture in `path`/config.json, or None when there is no such file here."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    try:
        return arch_from_config(json.loads(p.read_text()), vision_only)
    except (ArchError, json.JSONDecodeError) as e:
        raise ArchError(f"{p}: {e}") from None


# --------------------------------------------------------------------------- the `plan:` section

# The config fields of each stage kind that name a model folder, i.e. the keys `plan.architectures` may use.
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "model.assemble": ("vision", "llm"),
    "reassemble": ("model", "llm"),
    "sft": ("model",),
    "grpo": ("model",),
    "eval": ("model",),
    "data.import": ("model",),
    "generate": ("model",),
    "distill": ("model",),
}


class PlanConfig(BaseModel):
    """The workflow's `plan:` section: what `r1v plan` needs besides the stages. `r1v run` ignores it."""

    model_config = ConfigDict(extra="forbid")

    architectures: dict[str, str] = Field(
        {},
        description="'<stage>.<field>' -> preset name, for model folders that are not on this machine "
        "(a folder with config.json wins)",
    )
    reserve_gb: float = Field(2.0, ge=0, description="per GPU: CUDA context, NCCL buffers, allocator slack")

    @field_validator("architectures")
    @classmethod
    def _known_presets(cls, v: dict[str, str]) -> dict[str, str]:
        for key, name in v.items():
            if key.count(".") != 1 or not all(key.split(".")):
                raise ValueError(f"key {key!r} is not of the form <stage>.<field>")
            if name not in PRESETS:
                raise ValueError(f"{key}: unknown architecture preset {name!r}; known: {', '.join(PRESETS)}")
        return v

    def check_stages(self, kinds: dict[str, str]) -> None:
        """Every key names a stage of the workflow and one of its kind's model fields ({stage: kind})."""
        for key in self.architectures:
            stage, fld = key.split(".")
            if stage not in kinds:
                raise ValueError(f"architectures: {key!r} names no stage of the workflow")
            allowed = MODEL_FIELDS.get(kinds[stage], ())
            if fld not in allowed:
                raise ValueError(
                    f"architectures: {key!r}: a {kinds[stage]} stage has no model field {fld!r} "
                    f"(it has: {', '.join(allowed) or 'none'})"
                )
