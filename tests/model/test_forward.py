import copy

import pytest
import torch

from r1v.model import image_features, multimodal_logits, num_image_tokens, vision_features


def _batch(model, n_tiles: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows, each with its own image."""
    img, per = model.config.image_token_id, num_image_tokens(model)
    rows = [[7, *[img] * (per * n_tiles[0]), 8, 9, 10], [11, *[img] * (per * n_tiles[1]), 12]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_matches_model_forward(vlm, pixel_values) -> None:
    ids, mask = _batch(vlm, (2, 1))
    with torch.no_grad():
        expected = vlm(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits
        got = multimodal_logits(vlm, ids, mask, pixel_values)
    assert got.shape == expected.shape == (2, ids.shape[1], vlm.lm_head.out_features)
    torch.testing.assert_close(got, expected)


def test_features_match_get_image_features(vlm, pixel_values) -> None:
    with torch.no_grad():
        ours = image_features(vlm, pixel_values)
        ref = vlm.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    assert ours.shape == (pixel_values.shape[0] * num_image_tokens(vlm), vlm.config.text_config.hidden_size)
    torch.testing.assert_close(ours, ref.reshape(ours.shape))


def test_other_projector_changes_logits_and_precomputed_features_agree(vlm, pixel_values) -> None:
    ids, mask = _batch(vlm, (2, 1))
    reference = copy.deepcopy(vlm.model.multi_modal_projector)
    with torch.no_grad():
        for p in vlm.model.multi_modal_projector.parameters():
            p.add_(0.5 * torch.randn_like(p))
        policy = multimodal_logits(vlm, ids, mask, pixel_values)
        ref = multimodal_logits(vlm, ids, mask, pixel_values, projector=reference)
        feats = vision_features(vlm, pixel_values)
        ref_cached = multimodal_logits(vlm, ids, mask, projector=reference, features=feats)
    assert not torch.allclose(policy, ref)
    torch.testing.assert_close(ref, ref_cached)
    torch.testing.assert_close(policy[:, :1], ref[:, :1])  # causal: positions before the image agree


def test_count_mismatch_is_explained(vlm, pixel_values) -> None:
    ids, mask = _batch(vlm, (1, 1))
    with pytest.raises(ValueError, match="hold 8 <IMG_CONTEXT> tokens but the images give 12"):
        multimodal_logits(vlm, ids, mask, pixel_values)
    with pytest.raises(ValueError, match="no pixel_values"):
        multimodal_logits(vlm, ids, mask)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_other_feature_layer_matches_model_forward(vlm, tokenizer, spec, pixel_values, strategy: str) -> None:
    vlm.config.vision_feature_layer = -2  # the patch embeddings, before the only encoder layer
    vlm.config.vision_feature_select_strategy = strategy
    if strategy == "full":  # CLS kept: 17 tokens per tile cannot be pixel-shuffled
        with pytest.raises(ValueError, match="17 vision tokens per tile do not form a square grid"):
            vision_features(vlm, pixel_values)
        return
    ids, mask = _batch(vlm, (2, 1))
    with torch.no_grad():
        expected = vlm(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits
        torch.testing.assert_close(multimodal_logits(vlm, ids, mask, pixel_values), expected)
