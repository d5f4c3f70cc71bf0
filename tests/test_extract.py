"""Extractors recover planted directions; extraction over a tiny model; contrastive data loading."""

import json

import pytest
import torch
from conftest import tiny_lm

import steerscope as ss
from steerscope.directions.data import BUILTIN, from_pairs, from_sets, load_contrast, load_pairs, load_prompts
from steerscope.directions.extract import EXTRACTORS, ExtractConfig, extract, probe_accuracy, separation


def planted(n=1000, d=16, seed=0, shift=2.5):
    """Paired activations: a shared per-pair base (std 1), small per-text noise, and a shift of
    `shift` along a hidden unit direction on side A. Classes overlap (not linearly separable),
    the regime where a logistic probe estimates the class-mean direction consistently."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    direction /= direction.norm()
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = lambda: torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    a = base + noise() + shift * direction
    b = base + noise()
    return a, b, direction


@pytest.mark.parametrize("method", sorted(EXTRACTORS))
def test_extractor_recovers_planted_direction(method):
    a, b, true = planted()
    v = EXTRACTORS[method](a, b, True)
    cos = float(v @ true / v.norm())
    assert cos >= 0.99, f"{method}: cos {cos:.3f}"  # also checks the sign: B -> A
    # scaled like diffmean: the shift along the direction is recovered
    assert abs(float(v @ true) - 2.5) < 0.25


def test_unpaired_sets_and_pca_needs_pairs():
    a, b, true = planted()
    for m in ("diffmean", "pca_center", "probe"):
        v = EXTRACTORS[m](a[:500], b[100:], False)
        assert float(v @ true / v.norm()) > 0.95
    with pytest.raises(ss.SteerscopeError, match="paired"):
        EXTRACTORS["pca"](a, b, False)


def test_statistics_are_informative():
    a, b, true = planted()
    other = torch.linalg.qr(torch.stack([true, torch.randn(16, dtype=torch.float64)], 1))[0][:, 1]  # orthogonal to true
    assert separation(a, b, true) > 2 and abs(separation(a, b, other)) < 0.3
    assert probe_accuracy(a, b) > 0.85
    assert probe_accuracy(a[:500], a[500:]) < 0.6  # no signal: near chance


@pytest.mark.parametrize("read,per_layer", [("last", 1), ("mean", 1), ("last:2", 2)])
def test_extract_on_tiny_model(read, per_layer):
    lm = tiny_lm("llama")
    data = from_pairs(
        ["good day", "good night", "good morning", "good evening"],
        ["bad day", "bad night", "bad morning", "bad evening"],
    )
    vs = extract(lm, data, ExtractConfig(read=read, layers=[0, 2]), progress=False)
    assert len(vs) == 2 * per_layer and sorted(set(vs.layers)) == [0, 2]
    stats = vs.config.hyperparams["stats"]
    assert len(stats) == len(vs) and all({"norm", "separation", "probe_acc"} <= set(s) for s in stats)
    assert all(s["separation"] > 0 for s in stats)  # pointing from B to A
    # float64 accumulation vs a direct float32 computation: same direction
    from steerscope.models import collect_activations

    if read in ("last", "mean"):
        acts = lambda texts: collect_activations(lm, texts, [0, 2], read=read)[:, 0].float()  # noqa: E731
        manual = acts(data.a).mean(0) - acts(data.b).mean(0)
        assert torch.allclose(vs.vectors, manual, atol=1e-4)


def test_extract_errors():
    lm = tiny_lm("llama")
    data = from_pairs(["a b"], ["c d"])
    with pytest.raises(ss.SteerscopeError, match="--method must be one of"):
        extract(lm, data, ExtractConfig(method="magic"), progress=False)
    with pytest.raises(ss.SteerscopeError, match=r"read \(--read\): expected"):
        extract(lm, data, ExtractConfig(read="first"), progress=False)
    with pytest.raises(ss.SteerscopeError, match="needs paired data"):
        extract(lm, from_sets(["a"], ["b", "c"]), ExtractConfig(method="pca"), progress=False)
    with pytest.raises(ss.LayerError):
        extract(lm, data, ExtractConfig(layers=[5]), progress=False)


def test_data_loaders(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"positive": "yes", "negative": "no", "prompt": "Q?"}) + "\n")
    d = load_pairs(tmp_path / "p.jsonl")
    assert d.paired and d.a == ["yes"] and d.prompts == ["Q?"]
    lm = tiny_lm("llama")
    assert d.formatted(lm, chat=False) == (["Q?yes"], ["Q?no"])
    (tmp_path / "p.csv").write_text("positive,negative\nhappy,sad\nglad,upset\n")
    assert load_pairs(tmp_path / "p.csv").b == ["sad", "upset"]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ss.SteerscopeError, match="empty"):
        load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "cols.csv").write_text("pos,neg\na,b\n")
    with pytest.raises(ss.SteerscopeError, match="lacks column"):
        load_pairs(tmp_path / "cols.csv")
    (tmp_path / "blank.csv").write_text("positive,negative\na,\n")
    with pytest.raises(ss.SteerscopeError, match="row 1 has an empty"):
        load_pairs(tmp_path / "blank.csv")
    with pytest.raises(ss.SteerscopeError, match="as many positives as negatives"):
        from_pairs(["a", "b"], ["c"])
    with pytest.raises(ss.SteerscopeError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ss.SteerscopeError, match="unknown dataset"):
        load_contrast("sentimental")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ss.SteerscopeError, match="not valid JSON"):
        load_pairs(tmp_path / "bad.jsonl")


def test_builtin_datasets():
    sizes = {name: len(make()) for name, make in BUILTIN.items()}
    assert sizes == {"sentiment": 60, "formal": 40, "french": 40, "refusal": 40}
    for name in ("neutral", "harmful", "harmless"):
        assert len(load_prompts(name)) == 40
    s = BUILTIN["sentiment"]()
    assert s.paired and all(p != n for p, n in zip(s.a, s.b))
