"""KL matching (issue 13's comparison at matched side effects): the searched coefficient hits
its per-token KL budget within the tolerance, scales with the vector, and says when a budget
cannot be reached."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm, rand_vec

from steerscope.errors import SteerscopeError
from steerscope.judging.kl_match import KLMatchConfig, Rollouts, match_kl

PROMPTS = ["Hello there", "Tell me a story", "abc"]


@pytest.fixture(scope="module")
def setup():
    lm = make_tiny_lm("llama")
    return lm, Rollouts(lm, PROMPTS, tokens=12, chat=False)


@pytest.mark.parametrize("target", [0.05, 0.5])
def test_match_hits_the_target_within_10_percent(setup, target):
    lm, ro = setup
    v = rand_vec(lm)
    cfg = KLMatchConfig(target=target, quantile=0.95, tokens=12)
    m = match_kl(ro, v, 1, cfg)
    assert m.hit and abs(m.kl - target) <= 0.1 * target, m.curve
    # an independent measurement at the returned coefficient agrees
    again = float(torch.quantile(ro.kl(v, 1, m.coef), 0.95))
    assert abs(again - target) <= 0.1 * target
    assert len(m.curve) <= cfg.max_iters


def test_kl_grows_with_the_coefficient_and_the_match_scales_with_the_norm(setup):
    lm, ro = setup
    v = rand_vec(lm)
    kls = [float(torch.quantile(ro.kl(v, 1, c), 0.95)) for c in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert kls[0] < 1e-6 and all(a < b for a, b in zip(kls, kls[1:])), kls
    a = match_kl(ro, v, 1, KLMatchConfig(target=0.3, rel_tol=0.02))
    b = match_kl(ro, 2 * v, 1, KLMatchConfig(target=0.3, rel_tol=0.02))
    assert a.hit and b.hit and b.coef == pytest.approx(a.coef / 2, rel=0.1)


def test_unreachable_budget_and_zero_vector(setup):
    lm, ro = setup
    tiny = rand_vec(lm) * 1e-9
    m = match_kl(ro, tiny, 1, KLMatchConfig(target=0.5, max_iters=6))
    assert not m.hit and len(m.curve) == 6 and m.kl < 0.5
    with pytest.raises(SteerscopeError, match="zero vector"):
        match_kl(ro, torch.zeros(lm.d_model), 1)
