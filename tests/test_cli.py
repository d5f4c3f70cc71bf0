"""The CLI on a tiny local checkpoint: output, saved vectors, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import steerscope
from steerscope.cli import main


def test_help(capsys):
    for argv in (["--help"], ["info", "--help"], ["generate", "--help"]):
        assert main(argv) == 0
    assert "--contrast" in capsys.readouterr().out


def _python(*args: str) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh interpreter that imports this checkout's steerscope."""
    root = str(Path(steerscope.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_help_does_not_import_torch():
    """Listing the commands, and the help of commands without a library config, imports no torch;
    a command whose flags come from a library config imports it then (so the check can fail)."""
    code = """
import sys
from steerscope.cli import build_parser, main
build_parser(only=[])
for argv in (["--help"], ["sae", "--help"], ["sweep", "--help"], ["findings", "--help"], ["export", "--help"]):
    assert main(argv) == 0, argv
assert "torch" not in sys.modules, "torch was imported"
assert main(["discover", "--help"]) == 0
assert "torch" in sys.modules
"""
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert "norm-sweep" in r.stdout and "--grid" in r.stdout and "--run TEXT" in r.stdout and "--method" in r.stdout


@pytest.mark.parametrize("module", ["steerscope", "steerscope.cli"])
def test_python_dash_m(module):
    r = _python("-m", module, "norm-sweep", "--help")
    assert r.returncode == 0 and "--multiples" in r.stdout, r.stderr


def test_python_dash_m_cli_runs_each_file_once():
    """`python -m steerscope.cli` imports the package once and runs its __main__: no file of it is
    executed twice (as `__main__` and again as `steerscope.cli`, two registries of commands)."""
    code = """
import collections, runpy, sys
ran = collections.Counter()
sys.addaudithook(lambda event, args: ran.update([args[0].co_filename]) if event == "exec" and hasattr(args[0], "co_filename") else None)
sys.argv = ["steerscope", "--version"]
try:
    runpy.run_module("steerscope.cli", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code == 0, e.code
twice = [f for f, n in ran.items() if n > 1 and "steerscope" in f]
assert not twice, twice
assert sum("steerscope" in f for f in ran) > 10  # the hook saw the package's files
"""
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("steerscope ")


def test_info(ckpt, capsys):
    assert main(["info", "--model", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "valid layer indices 0..2" in out and "d_model  32" in out and "model_type=llama" in out


def test_generate_side_by_side_and_saved_vector(ckpt, tmp_path, capsys):
    argv = [
        "generate",
        "--model",
        str(ckpt),
        "--prompt",
        "Hello",
        "--prompt",
        "Bye",
        "--contrast",
        "good",
        "bad",
        "--layer",
        "1",
        "--coef",
        "8",
        "--max-new-tokens",
        "5",
        "--save-vector",
        str(tmp_path / "v"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and "unsteered" in out and "steered: diffmean-L1 @ layer 1, coef 8" in out
    assert (tmp_path / "v" / "config.json").is_file()
    assert main(argv) == 2  # the saved vector is never overwritten without --force
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--model",
                str(ckpt),
                "--prompt",
                "Hello",
                "--vector",
                str(tmp_path / "v"),
                "--coef",
                "4",
                "--max-new-tokens",
                "4",
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["vector_id"] for r in rows] == [None, "diffmean-L1"] and rows[1]["coef"] == 4.0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", "x", "--contrast", "a", "b", "--layer", "9"], "valid layers are 0..2"),
        (["generate", "--contrast", "a", "b", "--layer", "1"], "no prompts"),
        (["generate", "--prompt", "x"], "nothing to steer with"),
        (["generate", "--prompt", "x", "--vector", "/nonexistent/vec"], "not a steerscope vector folder"),
        (
            ["generate", "--prompt", "x", "--contrast", "a", "b", "--layer", "1", "--positions", "soon"],
            "cannot parse positions",
        ),
    ],
)
def test_errors_exit_nonzero_with_one_line(ckpt, capsys, argv, message):
    assert main(argv[:1] + ["--model", str(ckpt)] + argv[1:]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("steerscope: error:")


def test_unknown_model_exits_2(capsys):
    assert main(["info", "--model", "/definitely/not/here"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_supervised_workflow(ckpt, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"positive": f"good {w}", "negative": f"bad {w}"}) for w in ("day", "cat", "idea", "song"))
        + "\n"
    )
    m = ["--model", str(ckpt)]
    assert main(["extract", "--pairs", str(pairs), "--layers", "1:3", "--out", str(tmp_path / "cand"), *m]) == 0
    out = capsys.readouterr().out
    assert "diffmean-L1" in out and "diffmean-L2" in out and "probe_acc" in out
    assert main(["extract", "--pairs", str(pairs), "--out", str(tmp_path / "cand"), *m]) == 2  # no overwrite
    capsys.readouterr()
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nHow are you\nTell me more\n")
    default = ["select", "--vector", str(tmp_path / "cand"), "--metric", "logodds:a,e", "--a", str(prompts)]
    default += ["--b", str(prompts), "--neutral", str(prompts), *m]
    select = [*default, "--kl-bound", "1000", "--max-layer-frac", "1"]
    assert main([*select, "--table", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr()
    assert "induce" in out.out and "kl_add" in out.out and (tmp_path / "t.json").is_file()
    table = json.loads((tmp_path / "t.json").read_text())
    assert [c["id"] for c in table["candidates"]] == ["diffmean-L1", "diffmean-L2"]
    if table["best"] is not None:  # when a candidate passes, --save-best writes it as its own folder
        assert main([*select, "--save-best", str(tmp_path / "best")]) == 0
        assert json.loads((tmp_path / "best" / "config.json").read_text())["ids"] == [
            table["candidates"][table["best"]]["id"]
        ]
    else:  # no candidate passed: --save-best has nothing to write
        assert main([*default, "--save-best", str(tmp_path / "best")]) == 2
    assert main(["export", "--vector", str(tmp_path / "cand"), "--gguf", str(tmp_path / "cv.gguf")]) == 0
    assert "direction.{1,2}" in capsys.readouterr().out
    assert main(["import", "--gguf", str(tmp_path / "cv.gguf"), "--out", str(tmp_path / "back"), *m]) == 0
    assert (
        main(
            ["orthogonalize", "--vector", str(tmp_path / "cand"), "--index", "0", "--out", str(tmp_path / "ortho"), *m]
        )
        == 0
    )
    assert (tmp_path / "ortho" / "config.json").is_file()
    capsys.readouterr()
    assert main(["orthogonalize", "--vector", str(tmp_path / "cand"), "--out", str(tmp_path / "o2"), *m]) == 2
    assert "choose one with --index" in capsys.readouterr().err


def test_discover_and_sweep(ckpt, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nHow are you today\n")
    m = ["--model", str(ckpt)]
    base = ["discover", "--prompts", str(prompts), "--source", "0", "--target", "2", "--n-vectors", "3", *m]
    assert main(base + ["--method", "melbo", "--steps", "5", "--R", "2", "--out", str(tmp_path / "melbo")]) == 0
    out = capsys.readouterr().out
    assert "melbo: 3 vectors at layer 0 (target 2), R = 2" in out and "final objective" in out
    assert not (tmp_path / "melbo.partial").exists()  # checkpoint removed after success
    cfg = json.loads((tmp_path / "melbo" / "config.json").read_text())
    assert cfg["method"] == "melbo" and cfg["layers"] == [0, 0, 0] and len(cfg["hyperparams"]["final_objective"]) == 3
    assert main(base + ["--method", "jacobian", "--out", str(tmp_path / "jac")]) == 0
    out = capsys.readouterr().out
    assert "singular values" in out and "calibrated" in out
    assert (
        main(
            base + ["--method", "kl", "--steps", "2", "--R", "2", "--reply-tokens", "2", "--out", str(tmp_path / "kl")]
        )
        == 0
    )
    h = json.loads((tmp_path / "kl" / "config.json").read_text())["hyperparams"]
    assert h["kept_by"] == "completions" and h["candidates"] == 9 and len(h["kept"]) == 3  # kept as `run` keeps them
    assert main(base + ["--method", "random", "--R", "1", "--out", str(tmp_path / "jac")]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "norm-sweep",
                "--vector",
                str(tmp_path / "melbo"),
                "--prompts",
                str(prompts),
                "--multiples",
                "0.5,2",
                "--max-new-tokens",
                "4",
                *m,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "target change" in out and len(out.strip().splitlines()) == 3


def test_discover_resumes_from_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    """A killed run leaves OUT.partial; the same command resumes and matches an uninterrupted run."""
    import steerscope.directions.discovery.melbo as melbo

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nHow are you today\n")
    argv = [
        "discover",
        "--prompts",
        str(prompts),
        "--source",
        "0",
        "--target",
        "2",
        "--n-vectors",
        "4",
        "--vectors-per-batch",
        "2",
        "--method",
        "melbo",
        "--steps",
        "30",
        "--R",
        "2",
        "--model",
        str(ckpt),
    ]
    assert main(argv + ["--out", str(tmp_path / "straight")]) == 0
    real = melbo._train

    def killed(*a, **k):
        cb = lambda chunk, step: (_ for _ in ()).throw(KeyboardInterrupt()) if (chunk, step) == (1, 27) else None  # noqa: E731
        return real(*a[:-4], cb, *a[-3:])  # (..., callback, plateau, window, objective)

    monkeypatch.setattr(melbo, "_train", killed)
    assert main(argv + ["--out", str(tmp_path / "resumed")]) == 130
    assert (tmp_path / "resumed.partial" / "state.json").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(melbo, "_train", real)
    assert main(argv + ["--out", str(tmp_path / "resumed")]) == 0
    import torch

    from steerscope.directions import VectorSet

    a, b = VectorSet.load(tmp_path / "straight"), VectorSet.load(tmp_path / "resumed")
    assert torch.allclose(a.vectors, b.vectors, atol=1e-6)


def test_sae_train_and_eval(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(
        "\n\n".join(
            [
                "Hello there, how are you doing today my friend?",
                "A quiet morning in the small town.",
                "The cat sat on the mat and looked at the rain.",
            ]
            * 4
        )
    )
    m = ["--model", str(ckpt)]
    assert (
        main(
            [
                "sae",
                "train",
                "--layer",
                "1",
                "--text",
                str(text),
                "--n-latents",
                "64",
                "--k",
                "4",
                "--steps",
                "20",
                "--batch-size",
                "32",
                "--buffer",
                "128",
                "--out",
                str(tmp_path / "sae"),
                *m,
            ]
        )
        == 0
    )
    assert "L0 4.0" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["hook_layer"] == 1 and cfg["d_sae"] == 64
    assert (
        main(
            [
                "sae",
                "eval",
                "--sae",
                str(tmp_path / "sae"),
                "--text",
                str(text),
                "--baselines",
                "--json",
                str(tmp_path / "e.json"),
                *m,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "CE rec." in out and "pca (k=4)" in out and "ica (k=4)" in out
    assert set(json.loads((tmp_path / "e.json").read_text())) == {"sae", "pca (k=4)", "ica (k=4)", "random (k=4)"}
    assert (
        main(["sae", "train", "--layer", "1", "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "s2"), *m])
        == 2
    )


def test_sae_train_resumes_and_caches(ckpt, tmp_path, capsys, monkeypatch):
    """Killed mid-training: OUT.partial keeps a checkpoint, the same command resumes and gives the
    uninterrupted SAE; --cache fills the activation cache once and trains from it after."""
    import steerscope.sae.train as tr
    from steerscope.sae.formats import load_saelens

    text = tmp_path / "t.txt"
    text.write_text(
        "\n\n".join(f"Document {i}: the cat sat on the mat while rain fell on town {i}." for i in range(12))
    )
    base = [
        "sae",
        "train",
        "--layer",
        "1",
        "--text",
        str(text),
        "--n-latents",
        "32",
        "--k",
        "4",
        "--steps",
        "24",
        "--batch-size",
        "16",
        "--buffer",
        "64",
        "--checkpoint-every",
        "5",
        "--model",
        str(ckpt),
    ]
    assert main(base + ["--out", str(tmp_path / "straight")]) == 0
    assert json.loads((tmp_path / "straight" / "training.json").read_text())["steps"] == 24
    real = tr.SAE.project_decoder_grad
    calls = {"n": 0}

    def dies(self):
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(tr.SAE, "project_decoder_grad", dies)
    assert main(base + ["--out", str(tmp_path / "resumed")]) == 130
    assert (tmp_path / "resumed.partial" / "state.json").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(tr.SAE, "project_decoder_grad", real)
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "resumed")]) == 0
    assert "resuming from the checkpoint at step 15" in capsys.readouterr().err
    assert not (tmp_path / "resumed.partial").exists()
    a, b = load_saelens(tmp_path / "straight"), load_saelens(tmp_path / "resumed")
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)

    cache = tmp_path / "acts"
    assert main(base + ["--cache", str(cache), "--out", str(tmp_path / "c1")]) == 0
    assert "cached" in capsys.readouterr().err and any(cache.glob("acts-*.safetensors"))
    assert (
        main(base + ["--cache", str(cache), "--text", str(tmp_path / "gone.txt"), "--out", str(tmp_path / "c2")]) == 0
    )
    assert "training on the activations cached" in capsys.readouterr().err
    assert torch.equal(load_saelens(tmp_path / "c1").W_dec, load_saelens(tmp_path / "c2").W_dec)
    assert main(base + ["--out", str(tmp_path / "c1")]) == 2  # finished SAE: refused without --force


def test_sae_corpus_resumes(ckpt, tmp_path, capsys):
    out = tmp_path / "corpus.jsonl"
    argv = [
        "sae",
        "corpus",
        "--docs",
        "6",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "5",
        "--out",
        str(out),
        "--model",
        str(ckpt),
    ]
    assert main(argv) == 0
    full = out.read_text()
    rows = [json.loads(l)["text"] for l in full.splitlines()]
    assert len(rows) == 6 and all(r.strip() for r in rows)
    out.write_text(
        full.splitlines(keepends=True)[0] + full.splitlines(keepends=True)[1] + full.splitlines()[2][:9]
    )  # killed mid-write
    assert main(argv) == 0
    assert "continuing" in capsys.readouterr().err and out.read_text() == full  # torn batch redone identically
