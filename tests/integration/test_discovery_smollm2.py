"""Unsupervised discovery on the real SmolLM2-135M-Instruct."""

import pytest
import torch

import steerscope as ss
from steerscope.directions.data import load_prompts
from steerscope.directions.discovery import DiscoverConfig, discover, random_control

pytestmark = pytest.mark.integration


def test_melbo_vectors_elicit_more_distinct_completions_than_random(capsys):
    lm = ss.load_model()
    prompts = load_prompts("neutral")[:2]
    vs = discover(lm, prompts, DiscoverConfig.of("melbo", n_vectors=8, steps=60, R=4.0, seed=0), progress=False)
    assert torch.allclose(vs.vectors.norm(dim=-1), torch.full((8,), 4.0), atol=1e-3)
    control = random_control(lm, vs)
    learned = ss.generate(lm, prompts, vectors=vs, max_new_tokens=24, include_unsteered=False)
    rand = ss.generate(lm, prompts, vectors=control, max_new_tokens=24, include_unsteered=False)
    n_learned, n_random = len({r.text for r in learned}), len({r.text for r in rand})
    with capsys.disabled():
        print(
            f"\n[SmolLM2 MELBO, 8 vectors x 2 prompts, R=4] distinct greedy completions: learned {n_learned}, random {n_random}"
        )
    assert n_learned > n_random
    curves = vs.extras["curves"]
    assert (curves[:, -1] > curves[:, 0]).all()
