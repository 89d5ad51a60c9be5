import io
from pathlib import Path

import pytest
from PIL import Image
from test_import_helpers import (
    BROKEN_REASON,
    broken_images,
    huge_header_png,
    jpeg,
    odd_mode_images,
    png,
    tiny_model_dir,
)

from r1v.data.config import DataImportConfig
from r1v.data.pipeline import RowError
from r1v.data.validate import (
    BAD_RECORD,
    EMPTY_TURN,
    IMAGE_MARKERS,
    IMAGE_MISSING,
    IMAGE_TOO_LARGE,
    ROLES,
    TOO_LONG,
    Record,
    Validator,
    check_messages,
    normalize_image,
    read_image,
)
from r1v.model.tiling import load_image


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return tiny_model_dir(tmp_path_factory)


def _reason(fn, *args) -> str:
    with pytest.raises(RowError) as e:
        fn(*args)
    return e.value.reason


def test_good_images_keep_their_bytes() -> None:
    for data in (png(), jpeg(), png(mode="L", color=7)):
        out, size, converted = normalize_image(data, 10**6)
        assert out is data and size == (40, 30) and not converted


@pytest.mark.parametrize("name", sorted(odd_mode_images()))
def test_odd_modes_are_converted_to_rgb(name) -> None:
    data = odd_mode_images()[name]
    out, size, converted = normalize_image(data, 10**6)
    img = Image.open(io.BytesIO(out))
    assert converted and img.mode == "RGB" and img.format == ("JPEG" if name.endswith(".jpg") else "PNG")
    assert size == img.size == ((30, 40) if name == "exif6.jpg" else (40, 30))  # EXIF rotation applied
    assert load_image(out).size == size  # and not applied twice downstream


def test_conversions_keep_the_picture() -> None:
    img = odd_mode_images()
    gray16 = Image.open(io.BytesIO(normalize_image(img["gray16.png"], 10**6)[0]))
    assert gray16.getpixel((0, 0)) == (155, 155, 155)  # 40000 / 257, not clipped to white
    rgba = Image.open(io.BytesIO(normalize_image(img["rgba.png"], 10**6)[0]))
    assert rgba.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white, not black


@pytest.mark.parametrize("name", sorted(broken_images()))
def test_broken_images_have_reasons(name) -> None:
    expected = BROKEN_REASON[name.split("-")[0]]
    assert _reason(normalize_image, broken_images()[name], 50_000_000) == expected


def test_pixel_limit_is_checked_before_decoding() -> None:
    assert _reason(normalize_image, png(100, 100), 9_999) == IMAGE_TOO_LARGE
    assert normalize_image(png(100, 100), 10_000)[1] == (100, 100)
    assert _reason(normalize_image, huge_header_png(5000, 5000), 10**9) == "image_decode"  # the header lies


def test_read_image(tmp_path: Path) -> None:
    assert _reason(read_image, tmp_path / "nope.png", 100) == IMAGE_MISSING
    assert _reason(read_image, None, 100) == IMAGE_MISSING
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    assert _reason(read_image, tmp_path / "big.png", 100) == IMAGE_TOO_LARGE
    assert read_image(b"abc", 100) == b"abc"


U, A, S = "user", "assistant", "system"


def _m(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


@pytest.mark.parametrize("messages,n_images,answer,reason", [
    (_m((U, "<image> hi"), (A, "yo")), 1, "", None),
    (_m((S, "be nice"), (U, "hi"), (A, "yo"), (U, "more"), (A, "ok")), 0, "", None),
    (_m((U, "<image> what?")), 1, "42", None),                       # a prompt row with a ground truth
    (_m((U, "<image> what?")), 1, "", EMPTY_TURN),                   # nothing to learn from
    (_m((U, "hi"), (A, "   ")), 0, "", EMPTY_TURN),
    (_m((U, " "), (A, "yo")), 0, "", EMPTY_TURN),
    (_m((A, "yo"), (U, "hi")), 0, "", ROLES),
    (_m((U, "a"), (U, "b"), (A, "c")), 0, "", ROLES),
    (_m((U, "a"), (A, "b"), (U, "c")), 0, "", ROLES),
    (_m((U, "a"), (S, "b"), (A, "c")), 0, "", ROLES),
    (_m(("narrator", "a"), (A, "b")), 0, "", ROLES),
    (_m((U, "hi"), (A, "yo")), 1, "", IMAGE_MARKERS),
    (_m((U, "<image><image>"), (A, "yo")), 1, "", IMAGE_MARKERS),
    (_m((U, "<IMG_CONTEXT> hi"), (A, "yo")), 0, "", IMAGE_MARKERS),
    ([], 0, "", BAD_RECORD),
])
def test_check_messages(messages, n_images, answer, reason) -> None:
    if reason is None:
        check_messages(messages, n_images, answer)
    else:
        assert _reason(check_messages, messages, n_images, answer) == reason


def _rec(*turns, images=None) -> Record:
    return Record(id="r", location="f:1", messages=_m(*turns), images=list(images or []))


def test_length_drop_and_truncate(tiny_model) -> None:
    long = "word " * 400
    rec = _rec((U, "<image> q1"), (A, "short answer"), (U, "<image> q2"), (A, long), images=[png(), png()])
    cfg = DataImportConfig(format="llava", source="x", model=tiny_model, preprocess={"max_length": 200})
    assert Validator(cfg)(rec, "s").reason == TOO_LONG
    out = Validator(cfg.model_copy(update={"on_too_long": "truncate"}))(rec, "s")
    assert out.row is not None and out.truncated_turns == 2
    assert [m["content"] for m in out.row["messages"]] == ["<image> q1", "short answer"]
    assert len(out.row["images"]) == 1  # the dropped turn's image goes with it
    single = _rec((U, "q"), (A, long))
    assert Validator(cfg.model_copy(update={"on_too_long": "truncate"}))(single, "s").reason == TOO_LONG


def test_length_matches_encode_sft(tiny_model) -> None:
    from r1v.core.config import PreprocessConfig
    from r1v.data.pipeline import preprocess_row

    cfg = DataImportConfig(format="llava", source="x", model=tiny_model, preprocess={"max_length": 4096})
    rec = _rec((U, "<image> what is this?"), (A, "a red box"), images=[png(130, 50)])
    v = Validator(cfg)
    n = v.length(rec.messages, [(130, 50)])
    row = v(rec, "s").row
    got = preprocess_row(row, tiny_model, PreprocessConfig(max_length=4096))
    assert len(got["input_ids"]) == n
    assert v(rec.__class__(**{**rec.__dict__}), "s").row is not None
    tight = Validator(cfg.model_copy(update={"preprocess": PreprocessConfig(max_length=n)}))
    assert tight(rec, "s").row is not None
    assert Validator(cfg.model_copy(update={"preprocess": PreprocessConfig(max_length=n - 1)}))(
        rec, "s").reason == TOO_LONG
