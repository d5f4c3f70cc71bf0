"""`steerscope condition` on the real SmolLM2-135M-Instruct: the packaged harmful vs harmless sets.

Measured (seeds 0, 1, 2 of the default split; 28 train + 12 validation prompts per set, chat template
on): best layer 22 / 12 / 21, validation AUC 1.000 / 0.965 / 1.000, balanced accuracy 1.000 / 0.917 /
1.000; 13 to 22 of the 30 layers reach AUC >= 0.95. Prompt length alone gives AUC 0.75 on these sets.
"""

import pytest
import torch

import steerscope as ss
from steerscope.directions.condition import When, when_condition
from steerscope.directions.condition_fit import find_condition
from steerscope.directions.data import load_prompts
from steerscope.interventions import Add, Conditional, steer

pytestmark = pytest.mark.integration


def test_harmful_vs_harmless_condition_separates_and_the_gate_agrees():
    lm = ss.load_model()
    on, off = load_prompts("harmful"), load_prompts("harmless")
    fit = find_condition(lm, on, off, progress=False)
    b = fit.best
    assert b.auc >= 0.9 and b.val_acc >= 0.85  # measured 1.000 and 1.000 (seed 0)
    assert sum(f.auc >= 0.9 for f in fit.fits) >= 10  # measured 19 layers >= 0.95: not one lucky layer
    # the gate made from the saved set fires on the held-out prompts exactly as the fit counted
    cond = when_condition(fit.to_vector_set(lm), When(condition="harm"))
    for prompts, idx, rate in ((on, fit.val["on"], b.tpr), (off, fit.val["off"], b.fpr)):
        iv = Conditional(Add(torch.zeros(lm.d_model), layer=lm.n_layers - 1), cond)
        with torch.no_grad(), steer(lm, iv):
            lm.forward(**lm.encode([prompts[i] for i in idx], chat=None))
        assert int(iv.result.fired.sum()) == round(rate * len(idx))
