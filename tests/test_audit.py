"""`steerscope audit`: every method runs on a tiny fine-tune and its base, compute is counted, the
findings merge into one table and one report, a killed audit resumes, a model audited against
itself skips the diffing methods and sampling finds nothing; the black-box test is exact; bad
input is refused in one line."""

import dataclasses
import itertools
import json

import pytest
import torch
from conftest import finetuned, make_tiny_lm

from steerscope.cli import main
from steerscope.directions.discovery import DiscoverConfig
from steerscope.errors import SteerscopeError
from steerscope.generation import generate
from steerscope.jobs.audit import METHODS, AuditConfig, audit
from steerscope.jobs.audit_export import export_behaviour
from steerscope.jobs.audit_table import merge
from steerscope.judging.significance import compare_samples, stratified_greater
from steerscope.models.hooks import count_forwards, count_hooks


@pytest.fixture(scope="module")
def base():
    return make_tiny_lm("llama", chat=True)


def _cheap(monkeypatch):
    """Every steered method's run at test size: fewer prompts, no norm sweep, a few melbo steps."""
    real = AuditConfig.run_config

    def small(self, method):
        rc = real(self, method)
        d = rc.discover
        if d.method == "melbo":
            d = DiscoverConfig.of("melbo", steps=4, n_vectors=d.n_vectors, R=d.R, source=d.source, target=d.target)
        return dataclasses.replace(rc, discover=d, n_neutral=3, sweep_top=0, r_search_steps=0)

    monkeypatch.setattr(AuditConfig, "run_config", small)


def _cfg(**kw) -> AuditConfig:
    settings = dict(
        base="embedded",
        discovery="melbo",
        n_vectors=2,
        n_random=3,
        n_samples=1,
        n_sample_prompts=4,
        draws=2,
        max_new_tokens=5,
        R=4.0,
        source=1,
        target=2,
    )
    return AuditConfig(**{**settings, **kw})


def test_audit_runs_every_method_and_merges_them(base, tmp_path, monkeypatch):
    _cheap(monkeypatch)
    ft, u = finetuned(base, seed=2, scale=6.0, blocks=(0, 1))
    out = tmp_path / "audit"
    report = audit(_cfg(), out, lm=ft, base=base)
    t = json.loads((out / "audit.json").read_text())
    assert set(t["methods"]) == set(METHODS) and all(m["status"] == "ran" for m in t["methods"].values())
    for m in METHODS:  # each method's compute is measured, not assumed
        assert t["compute"][m]["seconds"] > 0 and t["compute"][m]["forward_tokens"] > 0, m
    for m in ("finetune", "weightdiff", "actdiff", "base"):
        assert (out / "methods" / m / "report.html").is_file()
    run_cfg = json.loads((out / "methods" / "weightdiff" / "config.json").read_text())["config"]
    assert run_cfg["discover"]["method"] == "weightdiff"
    # the sampling methods saw the same prompts and draws from the fine-tune, amplified, and base
    rows = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["model"] for r in rows}) == ["amplified", "base", "finetune"]
    assert all(sum(r["model"] == m for r in rows) == 4 * 2 for m in ("amplified", "base", "finetune"))
    assert t["same_weights"] is False
    for b in t["behaviours"]:
        assert b["ft_methods"] or b["in_base"]
        assert (b["id"] in t["changed"]) == (bool(b["ft_methods"]) and not b["in_base"])
    html = report.read_text()
    assert "What the fine-tune changed" in html and "Every method on one table" in html
    assert "methods/finetune/report.html" in html
    assert count_hooks(ft.model) == 0 and count_hooks(base.model) == 0
    # a second call resumes: nothing recomputed, the same table
    log_before = (out / "log.txt").read_text()
    audit(_cfg(), out, lm=ft, base=base)
    new = (out / "log.txt").read_text()[len(log_before) :]
    assert "method:finetune: reused" in new and "sample: reused" in new
    assert "1 stages computed, 7 reused" in new  # only the report is rebuilt
    assert json.loads((out / "audit.json").read_text()) == t
    _check_ablation_export(t, out, ft, base, u)


def _check_ablation_export(t, out, ft, base, u):
    """The weightdiff run's first candidate as a behaviour: its direction exported for ablation on
    the fine-tune, with the effect measured (the real path, on a behaviour made by hand)."""
    wd = t["methods"]["weightdiff"]["findings"]
    assert wd, "the weightdiff run has no candidate at all"
    t["behaviours"] = [{"id": 0, "typical": wd[0]["typical"], "surface": "", "words": [],
                        "found": [{"method": "weightdiff", "rank": wd[0]["rank"], "q": wd[0]["q"]}]}]  # fmt: skip
    (out / "audit.json").write_text(json.dumps(t))
    vs = export_behaviour(out, 1, out / "abl", ablation=True, lm=ft)
    hp = vs.config.hyperparams
    assert hp["intervention"] == "ablate" and len(vs) >= 1
    assert torch.allclose(vs.vectors.norm(dim=-1), torch.ones(len(vs)), atol=1e-5)
    assert max(abs(float(v @ u)) for v in vs.vectors) > 0.99  # the planted direction (top sigma)
    for e in hp["effect"]:
        assert e["kl_neutral"] > 0 and 0 <= e["share"] <= 1 and 0 <= e["share_ablated"] <= 1 and e["samples"] == 8
    t["behaviours"][0]["found"] = [{"method": "sample", "rank": 0, "q": 0.01}]
    (out / "audit.json").write_text(json.dumps(t))
    with pytest.raises(SteerscopeError, match="no direction to export"):
        export_behaviour(out, 1, out / "abl2", ablation=True, lm=ft)
    with pytest.raises(SteerscopeError, match="behaviours 1..1"):
        export_behaviour(out, 2, out / "abl2", lm=ft)
    assert main(["findings", "--run", str(out), "--ablation", "--out", str(out / "x")]) == 2


def test_self_audit_skips_diffing_and_sampling_finds_nothing(base, tmp_path, monkeypatch):
    _cheap(monkeypatch)
    out = tmp_path / "self"
    audit(_cfg(methods=["weightdiff", "actdiff", "sample", "amplify"]), out, lm=base, base=base)
    t = json.loads((out / "audit.json").read_text())
    assert t["same_weights"] is True
    assert t["methods"]["weightdiff"]["status"] == "skipped" and "equal" in t["methods"]["weightdiff"]["why"]
    # identical models and random streams: every cluster holds as many base samples as fine-tune ones
    for m in ("sample", "amplify"):
        assert t["methods"][m]["significant"] == 0
        assert all(f["q"] == 1.0 or f["p"] > 0.05 for f in t["methods"][m]["findings"])
    assert t["changed"] == []
    assert "No method found a significant change" in (out / "report.html").read_text()


def test_contrast_run_is_copied_in_and_checked(base, tmp_path, monkeypatch, capsys):
    _cheap(monkeypatch)
    ft, _ = finetuned(base, seed=2, scale=6.0, blocks=(0,))
    first = tmp_path / "first"
    audit(_cfg(methods=["base"]), first, lm=ft, base=base)
    second = tmp_path / "second"
    audit(_cfg(methods=["base"], contrast_run=str(first / "methods" / "base")), second, lm=ft, base=base)
    t = json.loads((second / "audit.json").read_text())
    assert t["compute"]["base"]["reused_from"] == str((first / "methods" / "base").resolve())
    same = lambda p: (p / "methods" / "base" / "completions.jsonl").read_text()  # noqa: E731
    assert same(first) == same(second)
    with pytest.raises(SteerscopeError, match="--contrast-run"):  # a base run with other settings, before any work
        audit(_cfg(n_vectors=4, contrast_run=str(first / "methods" / "base")), tmp_path / "third", lm=ft, base=base)
    assert not (tmp_path / "third").exists()
    capsys.readouterr()
    assert main(["findings", "--run", str(second)]) == 0
    listed = [l for l in capsys.readouterr().out.splitlines() if "found by" in l]
    assert all("[the base shows it too]" in l for l in listed)  # only the base ran: nothing the fine-tune changed


def _brute(strata):
    """P(sum of treated counts >= observed) by enumerating every within-prompt relabelling."""
    observed, outcomes = sum(k for k, *_ in strata), []
    for k, a, j, b in strata:
        units = [1] * (k + j) + [0] * (a + b - k - j)
        counts = [sum(units[i] for i in pick) for pick in itertools.combinations(range(a + b), a)]
        outcomes.append(counts)
    total = hit = 0
    for combo in itertools.product(*outcomes):
        total += 1
        hit += sum(combo) >= observed
    return hit / total


@pytest.mark.parametrize(
    "strata", [[(2, 3, 0, 3)], [(1, 2, 0, 2), (2, 3, 1, 3)], [(1, 2, 1, 2), (0, 2, 1, 2), (2, 2, 0, 3)]]
)
def test_stratified_test_is_the_exact_permutation_p_value(strata):
    assert stratified_greater(strata) == pytest.approx(_brute(strata), abs=1e-12)


def test_sample_comparison_finds_what_only_the_fine_tune_does():
    P, D = 8, 4
    models, prompts, labels = [], [], []
    for p in range(P):
        for d in range(D):
            models += ["finetune", "base"]
            prompts += [p, p]
            labels += [1 if d < 2 else 0, 0]  # the fine-tune half the time, the base never
    tests = compare_samples(models, prompts, labels, treated="finetune", control="base")
    assert tests[1].significant and tests[1].treated == 16 and tests[1].control == 0 and tests[1].prompts == 8
    assert not tests[0].significant  # both models' shared reply
    one = compare_samples(["finetune", "base"], [0, 0], [5, 6], treated="finetune", control="base")
    assert not one[5].testable and one[5].q == 1.0  # one completion can never be significant


def test_merge_joins_methods_and_sets_the_base_apart():
    f = lambda m, text, surface="", sig=True: {  # noqa: E731
        "method": m, "rank": 0, "q": 0.01, "significant": sig, "prompts": 2, "typical": text, "words": [],
        "surface": surface, "texts": [text],
    }  # fmt: skip
    found = [
        f("finetune", "ARR MATEY THE SEA", "written in capitals"),
        f("amplify", "HELLO THERE FRIEND", "written in capitals"),
        f("weightdiff", "Bonjour, je suis là", "in French"),
        f("base", "Bonjour, comment allez-vous", "in French"),
        f("sample", "nothing here", sig=False),
    ]
    bs = merge(found, 0.35)
    caps, french = bs
    assert caps["methods"] == ["finetune", "amplify"] and not caps["in_base"]
    assert french["methods"] == ["weightdiff", "base"] and french["in_base"]
    assert len(bs) == 2  # the non-significant candidate makes no behaviour


def test_count_forwards_counts_outer_calls_once_and_removes_its_hooks(base):
    from torch.nn.modules import module as m

    before = (len(m._global_forward_hooks), len(m._global_forward_pre_hooks))
    enc = base.tokenizer(["a b c", "d e f"], return_tensors="pt", padding=True)
    with count_forwards() as c:
        with torch.no_grad():
            base.model(**enc)  # the causal LM calls its inner model: one pass
    assert c.passes == 1 and c.tokens == enc["input_ids"].numel()
    with count_forwards() as g:
        generate(base, ["Hello there"], max_new_tokens=4, progress=False)
    assert g.passes == 4 and g.tokens > 4
    assert (len(m._global_forward_hooks), len(m._global_forward_pre_hooks)) == before


def test_audit_refuses_bad_input_in_one_line(base, tmp_path, capsys):
    with pytest.raises(SteerscopeError, match="--base MODEL"):
        AuditConfig(model=dataclasses.replace(AuditConfig().model, model=str(tmp_path))).base_spec()
    with pytest.raises(SteerscopeError, match="audit methods of their own"):
        AuditConfig(discovery="weightdiff")
    with pytest.raises(SteerscopeError, match="not a finished run"):
        audit(_cfg(contrast_run=str(tmp_path / "nope")), tmp_path / "a", lm=base, base=base)
    assert main(["audit", "--model", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base" in err[0]
    assert not (tmp_path / "b").exists()
