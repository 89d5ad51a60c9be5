"""A tiny byte-level BPE tokenizer built locally, so tests and the demo never touch a model hub.

It mirrors what the real models need: Qwen2-style chat turns (`<|im_start|>role ... <|im_end|>`), the
InternVL image tokens as special tokens, and `<think>`/`</think>` as single-id added tokens that are *not*
special (as in DeepSeek-R1-Distill-Qwen), so that `decode(..., skip_special_tokens=True)` keeps the
reasoning tags that the format reward looks for.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from r1v.model.tokens import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, PAD, THINK_END, THINK_START

SPECIAL_TOKENS: tuple[str, ...] = (PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)
"""Added as special tokens: control tokens that decoding for humans should drop."""

PLAIN_ADDED_TOKENS: tuple[str, ...] = (THINK_START, THINK_END)
"""Added as single-id, non-special tokens: they are part of the visible completion."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2 chat layout without Qwen's default system prompt."""

_WORDS = (
    "what is the sum of numbers in image how many objects are there which shape has largest area find value "
    "x y z answer question solve equation compute total difference product quotient circle square triangle "
    "rectangle red green blue yellow black white left right top bottom above below next to color count "
    "let me think step by step first then so therefore because we get result final check again wait "
    "the a an and or not of in on at to for with from is are was be this that these those it its "
    "number numbers digit digits image picture figure chart table plot graph bar line point angle degree "
    "length width height radius diameter perimeter volume probability percent ratio average mean median "
    "true false yes no option choice correct one two three four five six seven eight nine ten hundred"
)
_SENTENCES = (
    "What is the sum of the numbers in the image?",
    "How many objects are in the picture?",
    "Which option is correct? A. 1 B. 2 C. 3 D. 4",
    "Let me think step by step. First, 3 + 4 = 7. Then 7 * 2 = 14. So the answer is 14.",
    "The answer is \\boxed{42}.",
    "Answer: \\boxed{A}",
    "Therefore, x = \\frac{1}{2} and y^2 = 9, so \\boxed{3}.",
    "12 + 35 = 47, 100 - 58 = 42, 6 * 7 = 42, 81 / 9 = 9, 2^10 = 1024",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "You are a helpful assistant.",
    "system\nYou are a helpful assistant.\nuser\nWhat is 2 + 3?\nassistant\n",
    "2 + 3 = 5.\n\nThe answer is \\boxed{5}.",
)


def _corpus(texts: Iterable[str] | None) -> list[str]:
    """The fixed training corpus plus caller texts, in a fixed order (BPE ties then resolve the same way)."""
    digits = [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 1000, 50)]
    arithmetic = [
        f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(0, 30, 3) for b in range(1, 20, 4)
    ]
    words = [_WORDS, _WORDS.capitalize(), _WORDS.upper(), "system user assistant " * 4]
    return [*_SENTENCES, *digits, *arithmetic, *words, *(texts or ())]


def build_tiny_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 512, split_digits: bool = False,
    extra_tokens: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE of at most `vocab_size` ids (added tokens included).

    The added tokens take the last ids, as in Qwen's tokenizers; eos is `<|im_end|>` (ends a chat turn) and
    pad is `<|endoftext|>`. `split_digits` gives every digit its own token, as Qwen2's pre-tokenizer does
    (arithmetic then works digit by digit instead of on memorised number tokens). `extra_tokens` are added as
    single-id, non-special tokens (a domain's vocabulary), before the `<think>` tags.
    """
    extra = list(extra_tokens)
    n_added = len(SPECIAL_TOKENS) + len(PLAIN_ADDED_TOKENS) + len(extra)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + n_added:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs {len(alphabet)} byte ids plus "
            f"{n_added} added tokens"
        )
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added, initial_alphabet=alphabet, min_frequency=2, show_progress=False
    )
    tok.train_from_iterator(_corpus(texts), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (*extra, *PLAIN_ADDED_TOKENS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IMG_START, IMG_END, IMG_CONTEXT],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
