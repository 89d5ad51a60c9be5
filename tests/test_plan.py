"""`r1v plan` and the 38B recipe: the arithmetic against DeepSpeed's estimators, instantiated models and torch's
saved tensors; the workflow file; the command's table and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1v.cli import main
from r1v.core.config import ConfigError
from r1v.plan.arch import PRESETS, LLMArch, VLMArch, arch_from_config, arch_from_dir
from r1v.plan.cost import llm_activations, model_states
from r1v.plan.planner import Planner, parse_memory
from r1v.workflow.schema import load_workflow

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("n_nodes,per_node", [(1, 1), (1, 8), (8, 8)])
@pytest.mark.parametrize("params,largest", [(38_392_158_592, 778_567_680), (1_543_714_304, 233_373_696)])
def test_model_states_equal_deepspeeds_estimators(params, largest, n_nodes, per_node):
    """All parameters trainable at 16 bits, no offload: the case DeepSpeed's own estimators cover."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = n_nodes * per_node
    _, z3, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=per_node, num_nodes=n_nodes, cpu_offload=False
    )
    _, z2 = estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=per_node, num_nodes=n_nodes, cpu_offload=False
    )
    assert sum(model_states(params, params, largest, n, 3, "bfloat16")) == pytest.approx(z3, abs=2)
    assert sum(model_states(params, params, largest, n, 2, "bfloat16")) == pytest.approx(z2, abs=2)


def test_frozen_parameters_have_weights_only():
    """The R1V case: 38B weights sharded, gradients and Adam states for the 92M projector only."""
    p, t, big, n = 38_392_158_592, 91_786_240, 778_567_680, 64
    w, g, o = model_states(p, t, big, n, 3, "bfloat16")
    assert w == 2 * p / n + 4 * big and g == 4 * t / n and o == 12 * t / n
    w0, g0, o0 = model_states(p, t, big, n, 0, "bfloat16")
    assert (w0, g0, o0) == (2 * p, 6 * t, 12 * t)
    assert model_states(p, t, big, n, 3, "float32") == (4 * p / n + 4 * big, 4 * t / n, 8 * t / n)


@pytest.mark.parametrize(
    "spec_kw",
    [
        {},
        {
            "num_layers": 3,
            "hidden_size": 96,
            "num_heads": 6,
            "num_kv_heads": 2,
            "vision_layers": 2,
            "vision_hidden_size": 48,
            "vision_heads": 4,
        },
    ],
)
def test_parameter_count_equals_the_instantiated_tiny_model(tmp_path, spec_kw):
    from deepspeed.runtime.zero.stage3 import model_to_params

    from r1v.model.config import TinySpec
    from r1v.model.freeze import GROUPS, apply_freeze
    from r1v.model.io import save_model
    from r1v.model.tiny import build_tiny_vlm

    model, tok = build_tiny_vlm(TinySpec(**spec_kw))
    arch = arch_from_dir(save_model(model, tok, tmp_path / "vlm"))  # read back from the saved config.json
    assert isinstance(arch, VLMArch)
    assert arch.params() == sum(p.numel() for p in model.parameters())
    assert (arch.params(), arch.largest_module()) == model_to_params(model)  # DeepSpeed's own count
    assert arch.groups() == apply_freeze(model, GROUPS)  # per trainable group, as r1v freezes them
    assert arch.tokens_per_tile() == model.config.image_seq_length


@pytest.mark.parametrize(
    "variant",
    [
        {"use_qk_norm": True, "norm_type": "rms_norm", "attention_bias": False},  # InternViT-6B's choices
        {"use_qk_norm": False, "norm_type": "layer_norm", "attention_bias": True, "use_mean_pooling": False},
    ],
)
def test_vision_formula_equals_the_instantiated_tower(variant):
    from transformers import InternVLVisionConfig, InternVLVisionModel

    cfg = InternVLVisionConfig(
        hidden_size=40,
        num_hidden_layers=2,
        num_attention_heads=5,
        intermediate_size=96,
        image_size=56,
        patch_size=14,
        **variant,
    )
    tower = InternVLVisionModel(cfg)
    assert arch_from_config(cfg.to_dict()).params() == sum(p.numel() for p in tower.parameters())


def _hf_config(arch: VLMArch):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    v, lm = arch.vision, arch.llm
    vision = InternVLVisionConfig(
        hidden_size=v.hidden,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        intermediate_size=v.intermediate,
        attention_bias=v.qkv_bias,
        use_qk_norm=v.qk_norm,
        norm_type=v.norm,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    text = Qwen2Config(
        hidden_size=lm.hidden,
        num_hidden_layers=lm.layers,
        num_attention_heads=lm.heads,
        num_key_value_heads=lm.kv_heads,
        intermediate_size=lm.intermediate,
        vocab_size=lm.vocab,
        tie_word_embeddings=lm.tie_embeddings,
    )
    return InternVLConfig(vision_config=vision, text_config=text, tie_word_embeddings=lm.tie_embeddings)


def test_38b_presets_equal_a_meta_device_model():
    """The presets at full size, counted by transformers on the meta device (no memory): 38.39B, projector 92M."""
    from transformers import InternVLForConditionalGeneration

    arch = PRESETS["Skywork-R1V-38B"]
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(_hf_config(arch))
    assert arch.params() == sum(p.numel() for p in model.parameters()) == 38_392_158_592
    assert arch.groups()["projector"] == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert round(arch.groups()["projector"] / 1e6) == 92  # the paper's "about 92M"
    assert arch.tokens_per_tile() == 256


@pytest.mark.parametrize("trainable", [False, True])
def test_llm_activation_bytes_equal_torchs_saved_tensors(trainable):
    """What autograd keeps in a small Qwen2 (SDPA, bf16, 5.4h SwiGLU and GQA like the 32B) against the formula."""
    from transformers import Qwen2Config, Qwen2Model

    h, i, layers, s = 640, 3456, 2, 256
    cfg = Qwen2Config(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=5,
        num_key_value_heads=1,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2Model(cfg).to(torch.bfloat16).requires_grad_(trainable)
    x = torch.randn(1, s, h, dtype=torch.bfloat16, requires_grad=True)  # the projector's output flows in
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (ptr := t.untyped_storage().data_ptr()) not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=x)
    llm = arch_from_config({**cfg.to_dict(), "model_type": "qwen2"})
    assert isinstance(llm, LLMArch)
    predicted = llm_activations(llm, s, 2, trainable, checkpointing=False)
    assert predicted == pytest.approx(sum(kept.values()), rel=0.02)


def test_parse_memory():
    assert parse_memory("80GB") == 80e9 and parse_memory("24G") == 24e9 and parse_memory("80") == 80e9
    assert parse_memory("141GiB") == 141 * 2**30
    with pytest.raises(Exception, match="not a memory size"):
        parse_memory("eighty")


# --------------------------------------------------------------------------- the 38B workflow


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "wf.yaml"
    p.write_text(text)
    return p


def test_plan_section_is_validated(tmp_path):
    base = "name: x\nstages:\n  a: {kind: model.assemble, config: {vision: /v, llm: /l}}\n"
    with pytest.raises(ConfigError, match="plan.architectures: .*unknown architecture preset 'Qwen-33B'"):
        load_workflow(_write(tmp_path, base + "plan: {architectures: {a.llm: Qwen-33B}}\n"))
    with pytest.raises(ConfigError, match="plan: .*'b.llm' names no stage"):
        load_workflow(_write(tmp_path, base + "plan: {architectures: {b.llm: Qwen2.5-32B}}\n"))
    with pytest.raises(ConfigError, match="plan: .*a model.assemble stage has no model field 'corpus'"):
        load_workflow(_write(tmp_path, base + "plan: {architectures: {a.corpus: Qwen2.5-32B}}\n"))
    with pytest.raises(ConfigError, match="plan.assume: Extra inputs are not permitted"):
        load_workflow(_write(tmp_path, base + "plan: {assume: {grpo_micro_batch: 1}}\n"))  # r1v has it: no assumption
    assert load_workflow(_write(tmp_path, base)).config.plan is None  # optional


def test_a_model_without_config_json_or_preset_is_named(tmp_path, capsys):
    p = _write(
        tmp_path,
        "name: x\nstages:\n  a: {kind: model.assemble, config: {vision: /v, llm: /l}}\n"
        "plan: {architectures: {a.vision: InternViT-300M-448px}}\n",
    )
    assert main(["plan", str(p), "--gpus", "1", "--gpu-memory", "80GB"]) == 2
    assert "stages.a.config.llm: no config.json at '/l'" in capsys.readouterr().err


def test_local_config_json_wins_over_presets(tmp_path):
    """Folders that exist are read, whatever preset the plan names; an SFT stage on them sizes the real model."""
    from r1v.model.config import TinySpec
    from r1v.model.io import save_llm, save_model
    from r1v.model.tiny import build_tiny_llm, build_tiny_vlm

    vlm, tok = build_tiny_vlm()
    llm = build_tiny_llm(TinySpec(), tok, seed=3)
    vdir, ldir = save_model(vlm, tok, tmp_path / "vlm"), save_llm(llm, tok, tmp_path / "llm")
    p = _write(
        tmp_path,
        f"""name: x
plan: {{architectures: {{a.vision: InternViT-6B-448px, a.llm: Qwen2.5-32B}}}}
stages:
  a: {{kind: model.assemble, config: {{vision: {vdir}, llm: {ldir}}}}}
  s: {{kind: sft, config: {{model: "@a.model", corpus: /nowhere, trainer: {{num_workers: 2, use_gpu: true}}}}}}
""",
    )
    plan = Planner(load_workflow(p), 2, 80e9).run()
    rows = {r.stage: r for r in plan.rows}
    assert rows["a"].params == rows["s"].params == sum(x.numel() for x in vlm.parameters())
    assert rows["s"].trainable == sum(x.numel() for x in vlm.model.multi_modal_projector.parameters())
    assert any(n.startswith("a.vision: ") and n.endswith("/config.json") for n in plan.notes)


def test_generate_score_select_are_sized(tmp_path, capsys):
    """generate: engine actors x tensor-parallel GPUs, like eval; score: a local scorer's GPUs, an openai judge
    none; select: CPU. Too few GPUs for the engines is refused, naming the stage."""
    p = _write(
        tmp_path,
        """name: x
plan: {architectures: {a.vision: InternViT-300M-448px, a.llm: Qwen2.5-1.5B-Instruct}}
stages:
  a: {kind: model.assemble, config: {vision: /v, llm: /l}}
  rm: {kind: score, config: {corpus: /c, scorer: {kind: local, model: /rm, head: reward, num_actors: 3,
                                                    num_gpus: 0.5}}}
  judge: {kind: score, config: {corpus: /c, scorer: {kind: openai, base_url: "http://j:1/v1", model: j}}}
  gen: {kind: generate, config: {model: "@a.model", corpus: /c, greedy: true, samples: 3,
                                 sampling: {max_new_tokens: 1000}, preprocess: {max_length: 1000},
                                 engine: {kind: vllm, num_engines: 3, num_gpus: 2, vllm: {tensor_parallel_size: 2}}}}
  ev: {kind: eval, config: {model: "@a.model", benchmark: math500, engine: {num_engines: 2, num_gpus: 1}}}
  sel: {kind: select, config: {corpus: "@rm.corpus", tau: 3, errors: "@gen.corpus"}}
""",
    )
    plan = Planner(load_workflow(p), 8, 80e9).run()
    rows = {r.stage: r for r in plan.rows}
    assert (rows["gen"].gpus, rows["gen"].role, rows["gen"].params) == (6, "engine", rows["a"].params)
    assert rows["gen"].mem[0] == pytest.approx(2.0 * rows["a"].params / 2)  # bf16 weights over 2-way TP
    assert (rows["ev"].gpus, rows["rm"].gpus, rows["judge"].gpus, rows["sel"].gpus) == (2, 2, 0, 0)
    assert (rows["rm"].role, rows["judge"].role, rows["sel"].role) == ("local", "openai", "cpu")
    note = next(n for n in plan.notes if n.startswith("generate: "))
    assert "(4 x 2000 tokens)" in note  # one greedy + 3 sampled generations of 1000 + 1000 tokens per row
    assert any("http://j:1/v1" in n for n in plan.notes) and any(n.startswith("local scorer") for n in plan.notes)
    assert main(["plan", str(p), "--gpus", "4", "--gpu-memory", "80GB"]) == 1
    assert "refused: stage 'gen' needs 6 GPUs, 2 more than the 4 given" in capsys.readouterr().err


def test_distill_and_distill_score_are_sized(tmp_path, capsys):
    """distill: its engines like generate, one chain per row in the note, an openai rewriter outside the plan;
    distill.score: the local judges' GPUs summed (held at once), an openai one none, no judge the CPU. A distill
    model may be named in plan.architectures. Too few GPUs for the distill engines is refused, naming the stage."""
    p = _write(
        tmp_path,
        """name: x
plan: {architectures: {a.vision: InternViT-300M-448px, a.llm: Qwen2.5-1.5B-Instruct, d2.model: Qwen2.5-1.5B-Instruct}}
stages:
  a: {kind: model.assemble, config: {vision: /v, llm: /l}}
  qs: {kind: distill.score, config: {corpus: /c,
       vision_judge: {scorer: {kind: local, model: /j, head: reward, num_actors: 3, num_gpus: 0.5}},
       text_judge: {scorer: {kind: local, model: /j, head: reward, num_actors: 1, num_gpus: 1}},
       integration_judge: {scorer: {kind: openai, base_url: "http://j:1/v1", model: j}}}}
  cues: {kind: distill.score, config: {corpus: /c}}
  d: {kind: distill, config: {model: "@a.model", corpus: "@qs.corpus", sampling: {max_new_tokens: 1000},
      preprocess: {max_length: 500}, judge: {kind: openai, base_url: "http://w:2/v1", model: w},
      engine: {kind: vllm, num_engines: 3, num_gpus: 2, vllm: {tensor_parallel_size: 2}}}}
  d2: {kind: distill, config: {model: /m, corpus: /c, judge: {kind: rule}}}
""",
    )
    plan = Planner(load_workflow(p), 8, 80e9).run()
    rows = {r.stage: r for r in plan.rows}
    assert (rows["qs"].gpus, rows["qs"].role, rows["cues"].gpus, rows["cues"].role) == (3, "local+openai", 0, "cpu")
    assert (rows["d"].gpus, rows["d"].role, rows["d"].params) == (6, "engine", rows["a"].params)
    assert rows["d"].mem[0] == pytest.approx(2.0 * rows["a"].params / 2)  # bf16 weights over 2-way TP
    assert rows["d2"].params == PRESETS["Qwen2.5-1.5B-Instruct"].params() and rows["d2"].gpus == 0  # CPU engine
    assert plan.notes["scorer at http://j:1/v1 (model 'j'): served outside the GPUs planned here"] == ["qs"]
    assert plan.notes["distill.score judges: their 3 GPUs are counted, their models' memory is not sized"] == ["qs"]
    assert plan.notes["rewriter at http://w:2/v1 (model 'w'): served outside the GPUs planned here"] == ["d"]
    assert any(n.startswith("distill: ") and "(1 x 1500 tokens)" in n for n in plan.notes)
    assert main(["plan", str(p), "--gpus", "4", "--gpu-memory", "80GB"]) == 1
    assert "refused: stage 'd' needs 6 GPUs, 2 more than the 4 given" in capsys.readouterr().err
