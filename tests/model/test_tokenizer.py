from pathlib import Path

from transformers import AutoTokenizer

from r1v.model import build_tiny_tokenizer
from r1v.model.tokens import (
    IM_END,
    IM_START,
    IMG_CONTEXT,
    PAD,
    REQUIRED_SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
)


def test_deterministic() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 512


def test_extra_texts_change_merges_not_added_ids() -> None:
    base = build_tiny_tokenizer()
    extra = build_tiny_tokenizer(texts=["zebra quokka " * 20])
    assert len(extra.tokenize("zebra quokka")) < len(base.tokenize("zebra quokka"))
    for t in REQUIRED_SPECIAL_TOKENS:
        assert extra.convert_tokens_to_ids(t) == base.convert_tokens_to_ids(t)


def test_special_tokens_are_single_ids(tokenizer) -> None:
    for token in (*REQUIRED_SPECIAL_TOKENS, IM_START, IM_END, PAD):
        ids = tokenizer.encode(f"a{token}b", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(token) in ids
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == PAD


def test_think_tags_survive_skip_special_tokens(tokenizer) -> None:
    text = f"{THINK_START}\n1 + 1 = 2{THINK_END}\\boxed{{2}}{IM_END}"
    ids = tokenizer.encode(f"{IMG_CONTEXT}{text}", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.removesuffix(IM_END)
    assert tokenizer.decode(ids) == f"{IMG_CONTEXT}{text}"


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_save_load_round_trip(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "What is the sum of the numbers in the image? <img><IMG_CONTEXT></img> \\boxed{12}"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.eos_token, loaded.pad_token, len(loaded)) == (
        tokenizer.eos_token,
        tokenizer.pad_token,
        512,
    )
