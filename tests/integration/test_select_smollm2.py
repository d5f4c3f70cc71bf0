"""`select` on the real SmolLM2-135M-Instruct with the packaged harmful/harmless sets, as a user
runs it (refusal, mode ablate, no layer given), kept small: the auto KL budget, coherence of every
generated-for candidate, the held-out table with the orthogonalised weights, and the page."""

import pytest

import steerscope as ss
from steerscope.directions.data import load_prompts, load_sets
from steerscope.directions.extract import ExtractConfig, extract
from steerscope.judging.selection import SelectConfig, select
from steerscope.report.selection import render_selection

pytestmark = pytest.mark.integration


def test_refusal_select_end_to_end_on_smollm2():
    lm = ss.load_model()
    vs = extract(
        lm, load_sets("harmful", "harmless"), ExtractConfig(read="last:3", layers=[8, 14, 20], stats=False), False
    )
    a, b, neutral = load_prompts("harmful")[:10], load_prompts("harmless")[:10], load_prompts("neutral")[:8]
    cfg = SelectConfig(
        mode="ablate",
        shortlist=3,
        max_new_tokens=16,
        test_fraction=0.3,
        kl_random=6,
        examples=2,
        choose="diffmean-L14@-1",
    )
    sel = select(lm, vs, "refusal", a, b, neutral, cfg)
    assert sel.kl_rule.startswith("auto") and len(sel.random_kl) == 6 and 0 < sel.kl_budget < 5
    generated = [c for c in sel.candidates if c.coherence is not None]
    assert 3 <= len(generated) <= 4  # the short list, plus the candidate chosen by id
    assert all(c.coherent == (c.coherence >= -1.5) for c in generated)
    assert sel.best_candidate.id == "diffmean-L14@-1"
    ho = sel.heldout
    assert [c.name for c in ho.conditions] == ["baseline A", "ablation", "orthogonalised", "baseline B", "addition"]
    assert ho.n_a == 3 and ho.n_b == 3
    c = {x.name: x for x in ho.conditions}
    # the weights reproduce the hooks: the same greedy replies but for float noise
    same = sum(e["text"] == f["text"] for e, f in zip(c["ablation"].examples, c["orthogonalised"].examples))
    assert same >= 1 and abs(c["orthogonalised"].score - c["ablation"].score) <= 1 / 3 + 1e-9
    html = render_selection(sel)
    assert "KL budget" in html and "Held-out evaluation of diffmean-L14@-1" in html and "(chosen)" in html
