"""The opt-in null-model control of `steerscope run`: the shuffled/re-initialised copy keeps the
embeddings and each block matrix's values (shuffle) but not its structure, leaves the real model
untouched, and the run reports real vs null naturalness side by side."""

import json

import pytest
import torch
from conftest import make_tiny_lm

from steerscope.directions.discovery import DiscoverConfig
from steerscope.errors import SteerscopeError
from steerscope.jobs.run import RunConfig, run
from steerscope.models.null import null_copy


@pytest.mark.parametrize("kind", ["shuffle", "reinit"])
def test_null_copy_destroys_block_structure_only(kind):
    lm = make_tiny_lm("llama")
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    null = null_copy(lm, kind, seed=0)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # the real model is untouched
    changed = 0
    for (n, p), (_, q) in zip(lm.model.named_parameters(), null.model.named_parameters()):
        in_block = ".layers." in n
        if in_block and p.dim() >= 2:
            assert not torch.equal(p, q), n
            changed += 1
            if kind == "shuffle":  # the same values, elsewhere
                assert torch.equal(p.flatten().sort().values, q.flatten().sort().values), n
            else:
                assert abs(float(q.detach().std() / p.detach().std()) - 1) < 0.25, n
        else:
            assert torch.equal(p, q), n  # embeddings, norms, unembedding kept
    assert changed == 7 * lm.n_layers  # q, k, v, o, gate, up, down per block
    assert null.fingerprint != lm.fingerprint
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(lm.forward(ids).logits, null.forward(ids).logits)
    with pytest.raises(SteerscopeError, match="unknown null model"):
        null_copy(lm, "zero")


def test_run_with_a_null_model_control(tmp_path):
    lm = make_tiny_lm("llama", chat=True)
    cfg = RunConfig(
        n_train=2,
        n_heldout=1,
        n_neutral=3,
        max_new_tokens=6,
        sweep_multiples=[1.0],
        sweep_top=1,
        null_model="shuffle",
        discover=DiscoverConfig.of("melbo", n_vectors=3, steps=5, R=2.0, source=0, target=2),
    )
    report = run(cfg, tmp_path / "r", lm=lm)
    null = json.loads((tmp_path / "r" / "null.json").read_text())
    assert null["kind"] == "shuffle" and null["vectors"] == 3 and null["R"] > 0
    assert null["real"]["completions"] == 3 * 3 and null["null"]["completions"] == 3 * 3
    for side in ("real", "null"):
        assert null[side]["logprob_real"] < 0 and 0 < null[side]["distinct2"] <= 1 and 0 <= null[side]["changed"] <= 1
    html = report.read_text()
    assert "id='null-control'" in html and "shuffled copy" in html
    assert html.index("behaviours-found") < html.index("null-control")  # the finding stays first
    # without the flag there is no control stage
    plain = cfg.replace(null_model="none")
    run(plain, tmp_path / "plain", lm=lm)
    assert not (tmp_path / "plain" / "null.json").exists()
