"""Pretraining the miniature world's vision tower: transformers' InternVL vision tower learns to read digits.

The tower is the product's own class (`InternVLVisionModel`, inside an assembled
`InternVLForConditionalGeneration`), trained through r1v's own `vision_features` (last layer, CLS dropped, pixel
shuffle), so what it learns is exactly what the projector will see. A temporary linear read-out per image token
(one token per quadrant, naming its letter-and-digit, `A0` .. `D9`) is the pretraining objective, the analogue of the
classification or contrastive pretraining of a real ViT; the read-out is thrown away and the tower frozen.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import InternVLForConditionalGeneration

from r1v.model.forward import vision_features
from r1v.world.domain import CELL_TOKENS, sample_digits
from r1v.world.lm import say
from r1v.world.render import cell_symbols, render_digits, tile_array

CLASSES = list(CELL_TOKENS)


def digit_batch(rng: random.Random, n: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """n rendered tiles (uint8 [n, 3, 56, 56]) and each cell's class [n, 4] (an index into CLASSES)."""
    digits = [sample_digits(rng, split) for _ in range(n)]
    tiles = np.stack([tile_array(render_digits(d, rng)) for d in digits])
    labels = [[CLASSES.index(s) for s in cell_symbols(d)] for d in digits]
    return torch.from_numpy(tiles), torch.tensor(labels)


def pretrain_tower(vlm: InternVLForConditionalGeneration, *, steps: int, batch: int, lr: float, seed: int,
                   progress: Callable[[str], None] = say) -> dict[str, float]:
    """Train the vision tower (and a read-out it then drops) to name the symbol of each cell's token."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tower = vlm.model.vision_tower
    feat_dim = vlm.model.multi_modal_projector.layer_norm.normalized_shape[0]
    head = torch.nn.Linear(feat_dim, len(CLASSES))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    tower.train()
    t0, accs = time.time(), []
    for step in range(steps):
        tiles, digits = digit_batch(rng, batch)
        logits = head(vision_features(vlm, tiles))  # [n, 4 tokens, classes]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(CLASSES)), digits.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        accs.append(float((logits.argmax(-1) == digits).float().mean()))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            progress(f"[world] vision tower: step {step + 1}/{steps}, loss {float(loss.detach()):.3f}, "
                     f"cell accuracy {np.mean(accs[-20:]):.3f}, {time.time() - t0:.0f}s")
    tower.eval()
    with torch.no_grad():
        tiles, digits = digit_batch(random.Random(seed + 1), 1000, split="test")
        pred = head(vision_features(vlm, tiles)).argmax(-1)
    tower.requires_grad_(False)
    return {"cell_accuracy_test": float((pred == digits).float().mean()),
            "digit_accuracy_test": float((pred % 10 == digits % 10).float().mean())}
