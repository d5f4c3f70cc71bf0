"""`steerscope condition` (CAST condition vectors): the ROC/threshold math on planted scores; on a tiny
model two separable prompt families give AUC 1 and a threshold between the classes; the fit's scores
are the ones `Conditional` computes at run time; the saved set loads, `when_condition` turns it into a
gate that fires on ON prompts only; the CLI writes the folder and report and refuses what it should."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_lm

from steerscope.cli import main
from steerscope.directions.condition import When, is_condition_set, layer_id, when_condition
from steerscope.directions.condition_fit import (
    ConditionFitConfig,
    _direction,
    auc,
    best_threshold,
    find_condition,
    prompt_means,
    roc_curve,
)
from steerscope.directions.vectors import VectorSet
from steerscope.errors import SteerscopeError
from steerscope.interventions import Add, Conditional, steer
from steerscope.report.condition import render_condition


def _family(letters: str, n: int, seed: int) -> list[str]:
    """n distinct prompts of 6-14 characters drawn from `letters` (and spaces)."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters + " ") for _ in range(rng.randint(6, 14))).strip() or letters[0])
    return sorted(out)


ON, OFF = _family("abc", 16, 1), _family("xyz", 16, 2)


# ---- the statistics on planted scores --------------------------------------------------------------
def test_auc_and_roc_on_planted_scores():
    pos, neg = torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert auc(pos, neg) == 1.0 and auc(neg, pos) == 0.0
    assert auc(torch.tensor([0.2]), torch.tensor([0.2])) == 0.5  # a tie counts half
    roc = roc_curve(pos, neg)
    assert roc[0] == (0.0, 0.0) and roc[-1] == (1.0, 1.0)
    assert (0.0, 1.0) in roc  # a perfect separation reaches the top-left corner
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(roc, roc[1:]))  # monotone
    # interleaved: 0.5 > 0.4 but 0.3 < 0.4 ... the AUC counts the ordered pairs
    assert auc(torch.tensor([0.3, 0.5]), torch.tensor([0.4])) == 0.5


def test_best_threshold_separates_and_picks_the_side():
    pos, neg = torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    t, above, bal, tpr, fpr = best_threshold(pos, neg)
    assert above and 0.4 < t < 0.5 and bal == 1.0 and tpr == 1.0 and fpr == 0.0
    t, above, bal, tpr, fpr = best_threshold(-pos, -neg)  # ON below OFF: the gate is "<"
    assert not above and -0.5 < t < -0.4 and bal == 1.0
    # overlap: one OFF score above two ON ones; the best cut keeps the most balanced accuracy
    t, above, bal, tpr, fpr = best_threshold(torch.tensor([0.5, 0.6, 0.7, 0.8]), torch.tensor([0.1, 0.2, 0.65]))
    assert above and bal == pytest.approx(max((1 + 2 / 3) / 2, (0.5 + 1) / 2)) and 0.2 < t < 0.7


# ---- the fit on a tiny model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit():
    return find_condition(tiny_lm("llama"), ON, OFF, ConditionFitConfig(), progress=False, name="abc-vs-xyz")


def test_separable_families_give_auc_one_and_a_threshold_between(fit):
    lm = tiny_lm("llama")
    assert fit.layers == list(range(lm.n_layers)) and fit.vectors.shape == (lm.n_layers, lm.d_model)
    b = fit.best
    assert b.auc == 1.0 and b.val_acc == 1.0 and b.tpr == 1.0 and b.fpr == 0.0
    on, off = (b.scores_on, b.scores_off) if b.above else ([-s for s in b.scores_on], [-s for s in b.scores_off])
    t = b.threshold if b.above else -b.threshold
    assert max(off) < t < min(on)
    assert fit.n == {"on": 16, "off": 16, "on_train": 11, "on_val": 5, "off_train": 11, "off_val": 5}
    # ties (every layer perfect) go to the earlier layer; the choice is the lexicographic best
    key = lambda f: (f.val_acc, f.auc, -f.layer)  # noqa: E731
    assert fit.best_layer == max(fit.fits, key=key).layer


def test_split_is_seeded_and_methods_differ():
    lm = tiny_lm("llama")
    cfg = ConditionFitConfig(layers=[1], seed=3)
    a, b = (find_condition(lm, ON, OFF, cfg, progress=False) for _ in range(2))
    assert a.fits[0].scores_on == b.fits[0].scores_on and torch.equal(a.vectors, b.vectors)
    pca = find_condition(lm, ON, OFF, cfg.replace(method="pca"), progress=False)
    assert not torch.allclose(pca.vectors, a.vectors)
    # signed towards ON: the ON train mean projects higher than the OFF one, so the gate is ">"
    assert pca.fits[0].above and pca.fits[0].auc > 0.9


def test_lda_whitens_away_shared_within_class_variance():
    # planted: the classes differ by (1, 1), but both vary with std 5 along e1 and 0.1 along e0, so the
    # mean difference is half noise while the discriminant looks along e0, where the classes are apart
    g = torch.Generator().manual_seed(0)
    noise = lambda n: torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([0.1, 5.0])  # noqa: E731
    a, b = noise(400) + torch.tensor([1.0, 1.0]), noise(400)
    # (little shrinkage: in 2 dimensions the identity target, at the mean variance 12.5, swamps e0's 0.01)
    md, lda = _direction(a, b, "mean_diff"), _direction(a, b, "lda", 0.01)
    assert float(lda @ md) > 0 and lda.norm() == pytest.approx(float(md.norm()))  # signed towards ON, same length
    ta, tb = noise(300) + torch.tensor([1.0, 1.0]), noise(300)  # fresh draws: generalisation, not train fit
    assert auc(ta @ lda, tb @ lda) > 0.99 > 0.75 > auc(ta @ md, tb @ md)
    # shrinkage 1 is the identity covariance: the mean difference again
    assert torch.allclose(_direction(a, b, "lda", 1.0), md)


def test_explicit_validation_sets_judge_the_threshold():
    lm = tiny_lm("llama")
    cfg = ConditionFitConfig(layers=[1, 2])
    fit = find_condition(lm, ON[:10], OFF[:10], cfg, progress=False, val_on=ON[10:], val_off=OFF[10:13])
    assert fit.n == {"on": 10, "off": 10, "on_train": 10, "on_val": 6, "off_train": 10, "off_val": 3, "val_given": 1}
    assert fit.val == {"on": list(range(6)), "off": [0, 1, 2]}
    # every prompt of ON/OFF fits the vector: the plain split of the same 10 + 10 gives another vector
    split = find_condition(lm, ON[:10], OFF[:10], cfg, progress=False)
    assert not torch.allclose(fit.vectors, split.vectors)
    # the validation scores are the cosines of the given validation prompts with the fitted vector
    li = fit.layers.index(fit.best_layer)
    h = prompt_means(lm, ON[10:] + OFF[10:13], [fit.best_layer])[:, 0]  # (9, d)
    cos = torch.nn.functional.cosine_similarity(h, fit.vectors[li].double()[None], dim=-1)
    assert torch.allclose(cos, torch.tensor(fit.best.scores_on + fit.best.scores_off, dtype=torch.float64), atol=1e-5)
    lda = find_condition(
        lm, ON[:10], OFF[:10], cfg.replace(method="lda"), progress=False, val_on=ON[10:], val_off=OFF[10:]
    )
    assert lda.best.auc == 1.0 and not torch.allclose(lda.vectors, fit.vectors)
    with pytest.raises(SteerscopeError, match="both validation sets"):
        find_condition(lm, ON, OFF, cfg, progress=False, val_on=ON[:3])
    with pytest.raises(SteerscopeError, match="validation set is empty"):
        find_condition(lm, ON, OFF, cfg, progress=False, val_on=[], val_off=OFF[:3])


def test_degenerate_sets_raise_one_clear_error():
    lm = tiny_lm("llama")
    with pytest.raises(SteerscopeError, match="at least 4"):
        find_condition(lm, ON[:3], OFF, progress=False)
    with pytest.raises(SteerscopeError, match="same prompts"):
        find_condition(lm, ON, list(reversed(ON)), progress=False)
    with pytest.raises(SteerscopeError, match="val-fraction"):
        ConditionFitConfig(val_fraction=1.0)


def test_saved_set_loads_and_gates_on_prompts_like_the_fit(fit, tmp_path):
    lm = tiny_lm("llama")
    fit.to_vector_set(lm).save(tmp_path / "cond")
    vs = VectorSet.load(tmp_path / "cond", lm)
    hp = vs.config.hyperparams
    assert is_condition_set(vs) and vs.ids == [layer_id(l) for l in fit.layers]
    assert hp["best_layer"] == fit.best_layer and set(hp["condition"]) == {str(l) for l in fit.layers}
    assert {"threshold", "above", "auc", "val_acc", "tpr", "fpr"} <= set(hp["condition"][str(fit.best_layer)])
    cond = when_condition(vs, When(condition=str(tmp_path / "cond")))
    assert cond.layer == fit.best_layer and cond.threshold == pytest.approx(fit.best.threshold, abs=1e-6)
    last = lm.n_layers - 1
    for prompts, want in ((ON, True), (OFF, False)):
        iv = Conditional(Add(torch.zeros(lm.d_model), layer=last), cond)
        with torch.no_grad(), steer(lm, iv):
            lm.forward(**lm.encode(prompts))
        assert iv.result.fired.tolist() == [want] * len(prompts)
        # the run-time score of each held-out prompt is the one the fit judged
        got = iv.result.scores[:, 0]
        idx, val = (fit.val["on"], fit.best.scores_on) if want else (fit.val["off"], fit.best.scores_off)
        assert torch.allclose(got[idx], torch.tensor(val), atol=1e-4)
    # every layer's saved condition is usable, not only the best
    other = next(l for l in fit.layers if l != fit.best_layer)
    assert when_condition(vs, When(condition="c", layer=other)).layer == other


def test_report_renders_every_part(fit):
    lm = tiny_lm("llama")
    html = render_condition(fit.to_vector_set(lm), "runs/cond")
    assert html.count("<svg") == 3 and "★" in html and "runs/cond" in html
    assert "http" not in html  # offline page
    assert html.count("<tr") == 1 + len(fit.layers)


def test_narrow_scores_warn_in_the_fit_and_the_report(fit):
    import dataclasses

    assert fit.warning == ""  # the tiny families spread over more than 0.5 in cosine
    narrow = dataclasses.replace(fit.best, scores_on=[-0.971, -0.970], scores_off=[-0.975, -0.974])
    fits = [narrow if f.layer == fit.best_layer else f for f in fit.fits]
    bad = dataclasses.replace(fit, fits=fits)
    assert "span only 0.0050" in bad.warning
    assert "span only 0.0050" in render_condition(bad.to_vector_set(tiny_lm("llama")))


# ---- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    (d / "on.txt").write_text("\n".join(ON) + "\n")
    (d / "off.txt").write_text("\n".join(OFF) + "\n")
    return d / "on.txt", d / "off.txt"


def test_cli_writes_the_set_and_report_and_refuses_overwrite(ckpt, sets, tmp_path, capsys):
    out = tmp_path / "cond"
    argv = ["condition", "--sets", str(sets[0]), str(sets[1]), "--out", str(out), "--model", str(ckpt)]
    assert main(argv + ["--layers", "0,2"]) == 0
    text = capsys.readouterr().out
    assert "val_acc" in text and "best layer" in text and "--when" in text
    when = json.loads(text.split('"when": ', 1)[1].splitlines()[0])
    assert when["condition"] == str(out) and when["layer"] in (0, 2) and isinstance(when["above"], bool)
    vs = VectorSet.load(out)
    assert (
        vs.layers == [0, 2] and (out / "report.html").is_file() and vs.config.hyperparams["best_layer"] == when["layer"]
    )
    assert vs.config.hyperparams["condition"][str(when["layer"])]["threshold"] == pytest.approx(when["threshold"])
    assert main(argv) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--layers", "1", "--force"]) == 0
    assert VectorSet.load(out).layers == [1] and (out / "report.html").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sets", "no-such-set", "harmless"], "does not exist"),
        ([], "--sets ON OFF"),
        (["--sets", "harmless", "harmless"], "same prompts"),
    ],
)
def test_cli_bad_sets_exit_2(ckpt, tmp_path, capsys, extra, message):
    assert main(["condition", *extra, "--out", str(tmp_path / "c"), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "c").exists()


def test_report_in_a_real_browser(fit, tmp_path):
    from conftest import chrome
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"
    page.write_text(render_condition(fit.to_vector_set(tiny_lm("llama")), "cond"))
    driver = chrome(1100, 1600)
    try:
        driver.get(page.resolve().as_uri())
        svgs = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert len(svgs) == 3 and all(s.size["width"] > 200 and s.size["height"] > 100 for s in svgs)
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.best")) == 1
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.strip circle")) == sum(
            fit.n[k] for k in ("on_val", "off_val")
        )
        # nothing wider than the window (no horizontal scroll)
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 1100
    finally:
        driver.quit()
