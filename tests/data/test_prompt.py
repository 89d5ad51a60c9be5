import numpy as np
import pytest

from r1v.data.prompt import IGNORE_INDEX, build_prompt, encode_prompt, encode_sft, expand_image_markers
from r1v.model import build_tiny_tokenizer
from r1v.model.tokens import IM_END, IMG_CONTEXT, IMG_END, IMG_START


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _conv(answer: str = "<think>\n3 + 4 = 7</think>\nThe answer is \\boxed{7}.") -> list[dict[str, str]]:
    return [
        {"role": "user", "content": "<image>\nWhat is the sum of the numbers in the image?"},
        {"role": "assistant", "content": answer},
    ]


def _unmasked(enc: dict[str, list[int]]) -> list[int]:
    return [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX]


def test_expand_counts() -> None:
    out = expand_image_markers("a <image> b <image>", [2, 1], tokens_per_tile=3)
    assert out.count(IMG_CONTEXT) == 9
    assert out == f"a {IMG_START}{IMG_CONTEXT * 6}{IMG_END} b {IMG_START}{IMG_CONTEXT * 3}{IMG_END}"
    assert expand_image_markers("no image", [], 4) == "no image"


def test_expand_count_mismatch_names_both() -> None:
    with pytest.raises(ValueError, match="1 <image> marker.* but 2 image"):
        expand_image_markers("<image>", [1, 1], 4)
    with pytest.raises(ValueError, match="2 <image> marker.* but 1 image"):
        encode_prompt([{"role": "user", "content": "<image><image>"}], build_tiny_tokenizer(), [1], 4)


def test_build_prompt_layout(tok) -> None:
    text = build_prompt(_conv(), tok, [2], tokens_per_tile=4, system="Be brief.")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{IMG_START}{IMG_CONTEXT * 8}{IMG_END}\n"
        "What is the sum of the numbers in the image?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_sft_labels_cover_assistant_content_only(tok) -> None:
    enc = encode_sft(_conv(), tok, [2], tokens_per_tile=4, max_length=512)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert tok.decode(_unmasked(enc)) == "3 + 4 = 7</think>\nThe answer is \\boxed{7}." + IM_END
    assert enc["input_ids"].count(tok.convert_tokens_to_ids(IMG_CONTEXT)) == 8
    prompt = encode_prompt(_conv(), tok, [2], tokens_per_tile=4)
    assert enc["input_ids"][: len(prompt)] == prompt  # SFT trains on exactly what generation continues
    assert set(enc["labels"][: len(prompt)]) == {IGNORE_INDEX}
    assert enc["labels"][-2] == tok.convert_tokens_to_ids(IM_END)  # then the template's trailing newline
    assert enc["labels"][-1] == IGNORE_INDEX


@pytest.mark.parametrize(
    "answer", ["3 + 4 = 7</think>7", "<think>3 + 4 = 7</think>7", "<think>\n3 + 4 = 7</think>7"]
)
def test_think_opener_normalised(tok, answer: str) -> None:
    enc = encode_sft(_conv(answer), tok, [1], tokens_per_tile=4, max_length=512)
    assert tok.decode(enc["input_ids"]).count("<|im_start|>assistant\n<think>\n3 + 4") == 1
    assert tok.decode(_unmasked(enc)) == "3 + 4 = 7</think>7" + IM_END


def test_multi_turn_labels_every_assistant_turn(tok) -> None:
    messages = [
        {"role": "user", "content": "<image>\nHow many?"},
        {"role": "assistant", "content": "<think>\ncount</think>\\boxed{2}"},
        {"role": "user", "content": "And now <image>?"},
        {"role": "assistant", "content": "<think>\nagain</think>\\boxed{3}"},
    ]
    enc = encode_sft(messages, tok, [1, 3], tokens_per_tile=2, max_length=512)
    assert tok.decode(_unmasked(enc)) == f"count</think>\\boxed{{2}}{IM_END}again</think>\\boxed{{3}}{IM_END}"
    assert enc["input_ids"].count(tok.convert_tokens_to_ids(IMG_CONTEXT)) == 8


def test_prompt_drops_final_assistant_turn(tok) -> None:
    with_answer = encode_prompt(_conv(), tok, [1], tokens_per_tile=4)
    without = encode_prompt(_conv()[:1], tok, [1], tokens_per_tile=4)
    assert with_answer == without
    assert tok.decode(without).endswith("<|im_start|>assistant\n<think>\n")


def test_over_length_names_both_lengths(tok) -> None:
    n = len(encode_sft(_conv(), tok, [1], tokens_per_tile=4, max_length=10_000)["input_ids"])
    with pytest.raises(ValueError, match=f"sample has {n} tokens, more than max_length {n - 1}"):
        encode_sft(_conv(), tok, [1], tokens_per_tile=4, max_length=n - 1)


def test_bad_messages(tok) -> None:
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_sft(_conv()[:1], tok, [1], 4, 512)
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        encode_prompt([{"role": "robot", "content": "hi"}], tok, [], 4)
    with pytest.raises(ValueError, match="already contains <IMG_CONTEXT>"):
        encode_prompt([{"role": "user", "content": IMG_CONTEXT}], tok, [], 4)


def test_accepts_numpy_rows_from_ray_data(tok) -> None:
    messages = np.array(_conv(), dtype=object)
    tiles = np.array([2])
    assert encode_prompt(messages, tok, tiles, 4) == encode_prompt(_conv(), tok, [2], 4)
    assert encode_sft(messages, tok, tiles, 4, 512) == encode_sft(_conv(), tok, [2], 4, 512)
