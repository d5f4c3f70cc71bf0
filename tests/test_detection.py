"""Detection AUROC (max-over-tokens projection): exact on hand-made scores, high for a direction
planted in a model's residual stream, chance for a random one."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm

from steerscope.directions.extract import mean_difference
from steerscope.errors import SteerscopeError
from steerscope.judging.detection import auroc, detect, max_projection, roc_curve


def test_auroc_matches_hand_counts():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2, 2]) == 0.5  # one win, one loss
    assert auroc([2], [2]) == 0.5  # a tie counts half
    pts = roc_curve([3.0, 1.0], [2.0, 0.0])
    assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0)
    with pytest.raises(SteerscopeError, match="at least one"):
        auroc([], [1.0])


def _texts(with_z: bool, n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["the cat sat", "a red hat", "we ran far", "it is cold", "birds sing", "look at me", "one two three"]
    out = []
    for _ in range(n):
        a, b = rng.sample(words, 2)
        out.append(f"{a} zzzz {b}" if with_z else f"{a} {rng.choice(['aa', 'oo', 'ee'])} {b}")
    return out


def test_planted_concept_is_detected_and_random_is_not():
    lm = make_tiny_lm("llama")
    layer = 1
    train_pos, train_neg = _texts(True, 16, 0), _texts(False, 16, 1)
    vs = mean_difference(lm, train_pos, train_neg, [layer], chat=False)  # the planted concept: a run of z
    pos, neg = _texts(True, 24, 2), _texts(False, 24, 3)
    hard = [t.replace("zzzz", "zz") for t in _texts(True, 24, 4)]  # near misses: the same letter, shorter
    det = detect(lm, vs[0].vector, layer, pos, neg, hard)
    assert det.auroc > 0.95, det.auroc
    assert det.auroc_hard is not None and det.auroc_hard <= det.auroc
    g = torch.Generator().manual_seed(0)
    rand = detect(lm, torch.randn(lm.d_model, generator=g), layer, pos, neg)
    assert abs(rand.auroc - 0.5) < 0.35 and rand.auroc < det.auroc
    # paired: the same text with the z-run swapped out scores lower (the max finds the one place)
    a = max_projection(lm, pos, vs[0].vector, layer)
    b = max_projection(lm, [t.replace("zzzz", "aa") for t in pos], vs[0].vector, layer)
    assert sum(x > y for x, y in zip(a, b)) >= 0.9 * len(pos)
