"""Checkpoints in and out of the InternVL-chat / Skywork-R1V layout, and the `model.assemble` stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLConfig, InternVLVisionConfig, InternVLVisionModel, PreTrainedTokenizerFast
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from r1v.model import build_tiny_llm, load_model, save_llm, save_model
from r1v.model.assemble import assemble
from r1v.model.convert import ConversionError, detect_layout, to_hf, to_internvl_chat
from r1v.model.forward import image_features
from r1v.model.tokens import IM_END, IM_START, IMG_CONTEXT, PAD, REQUIRED_SPECIAL_TOKENS, THINK_END, THINK_START

torch.set_num_threads(1)


def _perturb(model, seed: int = 0):
    """Random layer scales, norms and biases too, so that a swapped or mis-split tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _skywork_like_vlm(spec, tokenizer):
    """InternViT-6B flavour (as in Skywork-R1V-38B): RMS norms, q/k norms, and here a qkv bias as well."""
    vc = InternVLVisionConfig(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=spec.tile_size,
        patch_size=spec.patch_size,
        use_qk_norm=True,
        norm_type="rms_norm",
        attention_bias=True,
    )
    llm = build_tiny_llm(spec, tokenizer)
    torch.manual_seed(0)
    proj = InternVLMultiModalProjector(InternVLConfig(vision_config=vc, text_config=llm.config, downsample_ratio=0.5))
    return assemble(InternVLVisionModel(vc), proj, llm, tokenizer, vision_config=vc).eval()


@pytest.fixture
def hf_dir(vlm, tokenizer, tmp_path: Path) -> Path:
    return save_model(_perturb(vlm), tokenizer, tmp_path / "hf")


@pytest.fixture
def chat_dir(hf_dir: Path, tmp_path: Path) -> Path:
    return to_internvl_chat(hf_dir, tmp_path / "chat")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_hf_chat_hf_round_trip_is_exact(hf_dir: Path, chat_dir: Path, tmp_path: Path) -> None:
    back = to_hf(chat_dir, tmp_path / "back")
    assert _equal(_weights(hf_dir), _weights(back))
    got = _config(back)
    assert got.pop("r1v_internvl_chat")["architectures"] == ["InternVLChatModel"]  # the chat-only fields, kept
    assert got == _config(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes() == (chat_dir / name).read_bytes()
    assert detect_layout(hf_dir) == "hf" and detect_layout(chat_dir) == "internvl-chat"


def test_chat_hf_chat_round_trip_is_exact(chat_dir: Path, tmp_path: Path) -> None:
    again = to_internvl_chat(to_hf(chat_dir, tmp_path / "hf2"), tmp_path / "chat2")
    assert _equal(_weights(chat_dir), _weights(again))
    assert _config(again) == _config(chat_dir)


def test_chat_layout_names_shapes_and_config(hf_dir: Path, chat_dir: Path, spec, tmp_path: Path) -> None:
    w, hf = _weights(chat_dir), _weights(hf_dir)
    d = spec.vision_hidden_size
    assert w["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (3 * d, d)
    assert torch.equal(
        w["vision_model.encoder.layers.0.attn.qkv.weight"][d : 2 * d],
        hf["vision_tower.encoder.layer.0.attention.k_proj.weight"],
    )
    assert torch.equal(w["vision_model.encoder.layers.0.ls2"], hf["vision_tower.encoder.layer.0.lambda_2"])
    assert torch.equal(w["mlp1.0.weight"], hf["multi_modal_projector.layer_norm.weight"])
    assert torch.equal(w["mlp1.3.bias"], hf["multi_modal_projector.linear_2.bias"])
    assert not any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in w)
    assert {k for k in w if k.startswith("language_model.")} == {k for k in hf if k.startswith("language_model.")}
    c = _config(chat_dir)
    assert (c["architectures"], c["model_type"], c["ps_version"], c["select_layer"]) == (
        ["InternVLChatModel"],
        "internvl_chat",
        "v2",
        -1,
    )
    assert (c["downsample_ratio"], c["force_image_size"], c["vision_config"]["image_size"]) == (0.5, 56, 56)
    assert c["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert c["torch_dtype"] == c["dtype"] == "float32"  # both spellings: vLLM may run on transformers < 4.56
    assert {"qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps", "initializer_factor"} <= set(
        c["vision_config"]
    )
    sky = _config(to_internvl_chat(hf_dir, tmp_path / "sky", variant="skywork", template="r1v"))
    assert (sky["architectures"], sky["model_type"], sky["template"]) == (
        ["SkyworkR1VChatModel"],
        "internvl_chat",
        "r1v",
    )


def test_sharded_bf16_tied_round_trip(tokenizer, pixel_values, tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1v.model import build_tiny_vlm

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model, _ = build_tiny_vlm(tokenizer=tokenizer, llm=Qwen2ForCausalLM(cfg))
    model = model.to(torch.bfloat16)
    hf = save_model(model, tokenizer, tmp_path / "hf")
    chat = to_internvl_chat(hf, tmp_path / "chat", max_shard_bytes=20_000)
    index = json.loads((chat / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and not any("lm_head" in k for k in index)
    back = to_hf(chat, tmp_path / "back", max_shard_bytes=30_000)
    loaded, _ = load_model(back, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    a, b = model.state_dict(), loaded.state_dict()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def _internvit_features(sd: dict[str, torch.Tensor], cfg: dict, px: torch.Tensor) -> torch.Tensor:
    """InternVL-chat image features computed from the chat tensors alone, written from InternViT's definition:
    x += attn(norm1(x)) * ls1, x += mlp(norm2(x)) * ls2, fused qkv read as q | k | v, then drop the CLS token,
    pixel shuffle (v2) and mlp1 = LayerNorm, Linear, GELU, Linear."""
    v = cfg["vision_config"]
    d, heads, eps = v["hidden_size"], v["num_attention_heads"], v["layer_norm_eps"]

    def norm(x, name):
        if v["norm_type"] == "rms_norm":
            return F.rms_norm(x, (d,), sd[name + ".weight"], eps)
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps)

    e = "vision_model.embeddings."
    x = F.conv2d(px, sd[e + "patch_embedding.weight"], sd[e + "patch_embedding.bias"], stride=v["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[e + "class_embedding"].expand(len(x), 1, d), x], 1) + sd[e + "position_embedding"]
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        qkv = F.linear(norm(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, val = qkv.chunk(3, -1)
        if v["qk_normalization"]:
            q = F.rms_norm(q, (d,), sd[p + "attn.q_norm.weight"], eps)
            k = F.rms_norm(k, (d,), sd[p + "attn.k_norm.weight"], eps)
        b, n, _ = q.shape
        q, k, val = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, val))
        a = F.scaled_dot_product_attention(q, k, val).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * sd[p + "ls1"]
        h = F.gelu(F.linear(norm(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]) * sd[p + "ls2"]
    x = x[:, 1:]
    n, s = len(x), int(x.shape[1] ** 0.5)
    x = x.reshape(n, s, s // 2, 2 * d).permute(0, 2, 1, 3).reshape(n, s // 2, s // 2, 4 * d).permute(0, 2, 1, 3)
    x = F.layer_norm(x.reshape(n, -1, 4 * d), (4 * d,), sd["mlp1.0.weight"], sd["mlp1.0.bias"])
    x = F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"])
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("flavour", ["tiny", "skywork"])
def test_chat_tensors_mean_the_same_model(flavour, vlm, spec, tokenizer, pixel_values, tmp_path: Path) -> None:
    model = _perturb(vlm if flavour == "tiny" else _skywork_like_vlm(spec, tokenizer))
    chat = to_internvl_chat(save_model(model, tokenizer, tmp_path / "hf"), tmp_path / "chat")
    with torch.no_grad():
        expected = image_features(model, pixel_values)
        got = _internvit_features(_weights(chat), _config(chat), pixel_values)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([[3, 4, *[model.config.image_token_id] * (4 * pixel_values.shape[0]), 5, 6]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits


def test_load_model_accepts_the_chat_layout(vlm, chat_dir: Path, pixel_values, tmp_path: Path) -> None:
    expected = _logits(vlm, pixel_values)
    loaded, tok = load_model(chat_dir)
    assert torch.equal(_logits(loaded, pixel_values), expected)
    assert tok.convert_tokens_to_ids(IMG_CONTEXT) == loaded.config.image_token_id == vlm.config.image_token_id
    cache = tmp_path / ".chat.r1v-hf"
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    load_model(chat_dir)  # converted once, then reused while the source is unchanged
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp


def _skywork_config(llm_config: dict, vision: dict, ps_version: str = "v2") -> dict:
    """A hand-written config.json in the form of the released Skywork-R1V-38B one, at tiny size."""
    return {
        "architectures": ["SkyworkR1VChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_skywork_chat.SkyworkChatConfig",
            "AutoModel": "modeling_skywork_chat.SkyworkR1VChatModel",
        },
        "model_type": "skywork_chat",
        "torch_dtype": "float32",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": vision["image_size"],
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": ps_version,
        "select_layer": -1,
        "template": "internvl2_5",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "llm_config": llm_config,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "dropout": 0.0,
            "drop_path_rate": 0.0,
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "layer_norm_eps": 1e-6,
            "num_channels": 3,
            "use_flash_attn": True,
            **vision,
        },
    }


def test_handwritten_skywork_checkpoint_converts(spec, tokenizer, pixel_values, tmp_path: Path) -> None:
    model = _perturb(_skywork_like_vlm(spec, tokenizer))
    chat = to_internvl_chat(save_model(model, tokenizer, tmp_path / "hf"), tmp_path / "sky")
    c = _config(chat)
    llm = {k: v for k, v in c["llm_config"].items()}
    vision = {
        k: c["vision_config"][k]
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "norm_type",
            "qk_normalization",
            "qkv_bias",
        )
    }
    (chat / "config.json").write_text(json.dumps(_skywork_config(llm, vision)))
    (chat / "r1v_conversion.json").unlink()
    assert detect_layout(chat) == "internvl-chat"
    hf = to_hf(chat, tmp_path / "hf2")
    assert _equal(_weights(tmp_path / "hf"), _weights(hf))
    stash = _config(hf)["r1v_internvl_chat"]
    assert stash["auto_map"]["AutoModel"].endswith("SkyworkR1VChatModel") and stash["vision_config"]["use_flash_attn"]
    loaded, _ = load_model(hf)
    assert torch.equal(_logits(loaded, pixel_values), _logits(model, pixel_values))
    back = _config(to_internvl_chat(hf, tmp_path / "sky2"))
    assert (back["architectures"], back["model_type"], back["auto_map"]) == (
        ["SkyworkR1VChatModel"],
        "skywork_chat",
        _skywork_config(llm, vision)["auto_map"],
    )
    (chat / "config.json").write_text(json.dumps(_skywork_config(llm, vision, ps_version="v1")))
    with pytest.raises(ConversionError, match="ps_version 'v1'"):
        to_hf(chat, tmp_path / "hf3")


def _edit(d: Path, fn) -> None:
    w = _weights(d)
    fn(w)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("layout", "edit", "message"),
    [
        (
            "chat",
            lambda w: w.update({"vision_model.encoder.layers.0.attn.extra.weight": torch.zeros(2)}),
            "'vision_model.encoder.layers.0.attn.extra.weight' has no place",
        ),
        (
            "chat",
            lambda w: w.update({"mlp1.1.weight": torch.zeros(3, 3)}),
            r"'multi_modal_projector.linear_1.weight' \(from 'mlp1.1.weight'\) has shape \[3, 3\]",
        ),
        (
            "chat",
            lambda w: w.update({"vision_model.encoder.layers.0.attn.qkv.weight": torch.zeros(31, 32)}),
            "'vision_model.encoder.layers.0.attn.qkv.weight' has shape \\[31, 32\\]",
        ),
        ("chat", lambda w: w.pop("mlp1.0.bias"), "missing, e.g. \\['multi_modal_projector.layer_norm.bias'\\]"),
        (
            "hf",
            lambda w: w.update({"vision_tower.layernorm.weight": torch.zeros(32)}),
            "'vision_tower.layernorm.weight' is not in the InternVL model",
        ),
        (
            "hf",
            lambda w: w.update({"vision_tower.encoder.layer.0.lambda_1": torch.zeros(5)}),
            r"'vision_tower.encoder.layer.0.lambda_1' has shape \[5\]",
        ),
    ],
)
def test_errors_name_the_tensor(layout, edit, message, hf_dir: Path, chat_dir: Path, tmp_path: Path) -> None:
    src = chat_dir if layout == "chat" else hf_dir
    _edit(src, edit)
    with pytest.raises(ConversionError, match=message):
        (to_hf if layout == "chat" else to_internvl_chat)(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_tensor_without_a_chat_name_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    from r1v.model.convert_keys import plan_to_chat

    with pytest.raises(ConversionError, match="'vision_tower.layernorm.weight' has no place"):
        plan_to_chat(["vision_tower.layernorm.weight"])
    with pytest.raises(ConversionError, match="v_proj.weight'\\] missing"):
        plan_to_chat([f"vision_tower.encoder.layer.0.attention.{x}_proj.weight" for x in "qk"])
    with pytest.raises(ConversionError, match="expected 'internvl-chat'"):
        to_hf(hf_dir, tmp_path / "x")


def test_cli_convert(hf_dir: Path, tmp_path: Path, capsys) -> None:
    from r1v.cli import main

    assert (
        main(
            [
                "model",
                "convert",
                "--to",
                "internvl-chat",
                str(hf_dir),
                "--out",
                str(tmp_path / "c"),
                "--variant",
                "skywork",
            ]
        )
        == 0
    )
    assert _config(tmp_path / "c")["architectures"] == ["SkyworkR1VChatModel"]
    assert main(["model", "convert", "--to", "hf", str(tmp_path / "c"), "--out", str(tmp_path / "h")]) == 0
    assert _equal(_weights(hf_dir), _weights(tmp_path / "h"))
    assert main(["model", "convert", "--to", "hf", str(hf_dir), "--out", str(tmp_path / "bad")]) == 2
    assert "expected 'internvl-chat'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def _plain_llm_dir(spec, tmp_path: Path) -> Path:
    """A causal LM whose byte-level BPE tokenizer has chat tokens but neither image nor reasoning tokens, and
    whose embedding tables have no spare rows."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["the cat sat on the mat", "what is two plus three"] * 4, trainer=trainer)
    t.add_special_tokens([AddedToken(x, special=True, normalized=False) for x in (PAD, IM_START, IM_END)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token=IM_END, pad_token=PAD)
    return save_llm(_perturb(build_tiny_llm(spec, tok, seed=3)), tok, tmp_path / "llm")


def test_assemble_stage_adds_missing_tokens(chat_dir: Path, hf_dir: Path, spec, pixel_values, tmp_path: Path) -> None:
    from r1v.model.config import AssembleConfig
    from r1v.model.io import load_llm
    from r1v.workflow import kinds
    from r1v.workflow.runner import StageContext

    assert kinds.get("model.assemble").config_class() is AssembleConfig
    with pytest.raises(ValueError, match="extra"):
        AssembleConfig(vision="v", llm="l", layers=3)
    llm_dir = _plain_llm_dir(spec, tmp_path)
    before, old_tok = load_llm(llm_dir)
    ctx = StageContext(
        name="asm",
        kind="model.assemble",
        run_dir=tmp_path,
        stage_dir=tmp_path / "stage",
        attempt=1,
        tracking_uri="",
        mlflow_run_id="",
    )
    out = kinds.get("model.assemble").run_function()(
        ctx, AssembleConfig(vision=str(chat_dir), llm=str(llm_dir), projector="from_vision", dtype="float32")
    )
    model, tok = load_model(out["model"])
    event = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()][-1]
    assert event["event"] == "assembled" and event["added_tokens"] == list(REQUIRED_SPECIAL_TOKENS)
    n = len(old_tok)
    ids = tok.convert_tokens_to_ids(list(REQUIRED_SPECIAL_TOKENS))
    assert ids == list(range(n, n + 5)) and model.config.image_token_id == tok.convert_tokens_to_ids(IMG_CONTEXT)
    assert (
        tok.decode(tok.encode(f"the{THINK_START}<img>cat{THINK_END}"), skip_special_tokens=True)
        == f"the{THINK_START}cat{THINK_END}"
    )
    for new, old in (
        (model.get_input_embeddings().weight, before.get_input_embeddings().weight),
        (model.lm_head.weight, before.lm_head.weight),
    ):
        assert new.shape[0] == n + 5 and torch.equal(new[:n], old)
        torch.testing.assert_close(new[n:], old.mean(0, keepdim=True).expand(5, -1))
    src = load_file(hf_dir / "model.safetensors")
    sd = model.state_dict()
    assert all(
        torch.equal(sd["model." + k], v)
        for k, v in src.items()
        if k.startswith(("vision_tower.", "multi_modal_projector."))
    )
    assert _logits(model, pixel_values).shape[-1] == n + 5


def test_assemble_fresh_projector_and_mismatch(hf_dir: Path, spec, tokenizer, tmp_path: Path) -> None:
    from r1v.model import ReassemblyError, TinySpec
    from r1v.model.from_parts import assemble_from_parts

    llm_dir = save_llm(build_tiny_llm(spec, tokenizer, seed=5), tokenizer, tmp_path / "r")
    a, _, report = assemble_from_parts(hf_dir, llm_dir, "fresh", seed=1, dtype="float32")
    b, _, _ = assemble_from_parts(hf_dir, llm_dir, "fresh", seed=1)
    assert report["added_tokens"] == [] and b.dtype == torch.bfloat16
    pa, pb = a.model.multi_modal_projector.state_dict(), b.model.multi_modal_projector.state_dict()
    assert all(torch.equal(pa[k].to(torch.bfloat16), pb[k]) for k in pa)
    src = load_file(hf_dir / "model.safetensors")
    assert not torch.equal(pa["linear_1.weight"], src["multi_modal_projector.linear_1.weight"])
    narrow = save_llm(build_tiny_llm(TinySpec(hidden_size=32), tokenizer), tokenizer, tmp_path / "narrow")
    with pytest.raises(ReassemblyError, match="outputs 64 features but the LLM's hidden size is 32"):
        assemble_from_parts(hf_dir, narrow, "from_vision")
