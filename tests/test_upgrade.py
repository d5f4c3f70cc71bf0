"""Upgrades keep what users saved: files written by release 0.2.0 (tests/fixtures/release_0_2_0,
made by that code, see its README) load and resume with the current code, a setting added since
changes neither a run's identity nor a checkpoint key, and a file from a newer steerscope says
"upgrade" before anything else.

The fixtures hold only 0.2.0's settings, so these tests keep passing when fields are added; the
tests that drop a field from a saved config simulate exactly that, with fields that exist today."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import steerscope as ss
from steerscope._version import CONFIG_FORMAT, __version__
from steerscope.checkpoint import Checkpoint, JobFolder, config_key, key_settings
from steerscope.cli import main
from steerscope.config import config_from_dict, config_to_dict, load_config
from steerscope.directions.discovery import DiscoverConfig, MelboConfig
from steerscope.directions.vectors import FORMAT_VERSION, VectorSet
from steerscope.jobs.run import RunConfig

FIX = Path(__file__).parent / "fixtures" / "release_0_2_0"
ARGV = json.loads((FIX / "argv.json").read_text())


@pytest.fixture
def old(tmp_path, monkeypatch):
    """A private copy of the 0.2.0 fixtures as the working folder (the runs name `model` and
    `p.txt` relative to it, as the command that made them did)."""
    for name in ("model", "p.txt", "vectors", "run_partial", "run_finished"):
        src = FIX / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _edit(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _warnings(err: str) -> list[str]:
    return [l for l in err.splitlines() if l.startswith("steerscope: warning:")]


# ---- vector files ---------------------------------------------------------------------------------
def test_a_0_2_0_vector_file_loads_with_the_same_tensors(old, capsys):
    want = json.loads((FIX / "expected.json").read_text())
    vs = VectorSet.load(old / "vectors")
    assert torch.equal(vs.vectors, torch.tensor(want["vectors"], dtype=torch.float32))
    assert vs.layers == want["layers"] and vs.ids == want["ids"]
    assert torch.equal(vs.extras["score"], torch.tensor(want["score"]))
    assert vs.config.hyperparams == {"R": 2.0, "steps": 4} and vs.config.steerscope_version == "0.2.0"
    assert not _warnings(capsys.readouterr().err)  # nothing in it is unknown
    lm = ss.load_model(str(old / "model"))
    VectorSet.load(old / "vectors", lm)  # still the same model: fingerprints agree


def test_a_vector_file_of_a_newer_format_says_upgrade_before_anything_else(old):
    # an unknown key AND a newer format: the format decides, and no "not a valid vector config"
    _edit(
        old / "vectors" / "config.json",
        lambda d: d.update(
            format_version=FORMAT_VERSION + 1,
            steerscope_version="9.1.0",
            layers="moved to the tensors file",
            new_thing=1,
        ),
    )
    with pytest.raises(ss.SteerscopeError) as e:
        VectorSet.load(old / "vectors")
    msg = str(e.value)
    assert f"written by steerscope 9.1.0, newer than this one ({__version__}): upgrade steerscope" in msg
    assert "not a valid" not in msg
    assert main(["generate", "--model", "model", "--prompt", "Hi", "--vector", "vectors"]) == 2


def test_a_vector_file_from_a_newer_minor_version_loads_and_names_its_extra_keys(old, capsys):
    _edit(old / "vectors" / "config.json", lambda d: d.update(steerscope_version="0.4.0", provenance={"by": "x"}))
    vs = VectorSet.load(old / "vectors")
    assert torch.equal(vs.vectors, VectorSet.load(FIX / "vectors").vectors)
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "provenance" in lines[0] and "newer steerscope" in lines[0]
    _edit(old / "vectors" / "config.json", lambda d: d.update(format_version="one"))
    with pytest.raises(ss.SteerscopeError, match="not a whole number"):
        VectorSet.load(old / "vectors")


# ---- run folders ----------------------------------------------------------------------------------
def test_a_0_2_0_run_killed_in_discovery_resumes_without_force(old, capsys, monkeypatch):
    """The 0.2.0 run was killed in chunk 1 of discovery: its calibration stage is reused and
    discovery continues from the 0.2.0 checkpoint (same key), rather than starting over."""
    loaded = []
    real = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self: loaded.append(real(self)) or loaded[-1])
    saved_config = (old / "run_partial" / "config.json").read_bytes()
    calibration = (old / "run_partial" / "calibration.json").read_bytes()
    assert main(ARGV + ["--out", "run_partial"]) == 0
    err = capsys.readouterr().err
    assert "resuming the run" in err and "calibrate ..." not in err and "discover ..." in err
    assert any(t is not None and t["chunk"] == 1 and t["step"] == 2 for t in loaded)  # the 0.2.0 state, not a fresh one
    lines = _warnings(err)  # fields added since 0.2.0, if any, filled with their defaults: one line, nothing ignored
    assert len(lines) <= 1 and all("take their defaults" in l and "ignored" not in l for l in lines)
    run = old / "run_partial"
    assert {"metrics.json", "completions.jsonl", "report.html"} <= {p.name for p in run.iterdir()}
    assert not (run / "vectors" / "learned.partial").exists()
    assert (run / "config.json").read_bytes() == saved_config and (run / "calibration.json").read_bytes() == calibration
    # chunk 0 was finished by 0.2.0 and kept: the first vector is the one the uninterrupted 0.2.0 run made
    mine, theirs = (
        VectorSet.load(run / "vectors" / "learned"),
        VectorSet.load(FIX / "run_finished" / "vectors" / "learned"),
    )
    assert torch.equal(mine.vectors[0], theirs.vectors[0])


def test_a_0_2_0_run_stopped_after_its_vectors_reuses_them(old, capsys):
    run = old / "run_finished"
    (run / "completions.jsonl").unlink()
    (run / "metrics.json").unlink()
    before = _files(run / "vectors")
    assert main(ARGV + ["--out", "run_finished"]) == 0
    err = capsys.readouterr().err
    for stage in ("calibrate", "discover", "control"):
        assert f"{stage} ..." not in err
    assert "generate ..." in err and "measure ..." in err
    assert _files(run / "vectors") == before and (run / "report.html").is_file()
    rows = [json.loads(l) for l in (run / "completions.jsonl").read_text().splitlines()]
    assert {r["vector_id"] for r in rows if r["set"] == "learned"} == set(
        VectorSet.load(run / "vectors" / "learned").ids
    )


def test_a_0_2_0_run_with_a_setting_really_changed_is_refused(old, capsys):
    before = _files(old / "run_finished")
    argv = list(ARGV)
    argv[argv.index("--max-new-tokens") + 1] = "5"
    assert main(argv + ["--out", "run_finished"]) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "max_new_tokens: saved 4, now 5" in err and "--force" in err
    assert _files(old / "run_finished") == before


def test_a_run_saved_before_a_field_existed_resumes_with_its_default_and_one_warning(old, capsys):
    """Simulates fields added after the run was saved, with fields that exist today: the saved
    config lacks them (one nested in the method's config), and has one this version lacks."""
    run = old / "run_finished"
    (run / "metrics.json").unlink()

    def older(d):
        del d["config"]["r_random"], d["config"]["discover"]["method_config"]["plateau_window"]
        d["config"]["retired_knob"] = 3

    _edit(run / "config.json", older)
    assert main(ARGV + ["--out", "run_finished"]) == 0
    err = capsys.readouterr().err
    lines = _warnings(err)
    assert len(lines) == 1, err  # the run checks its folder twice; one line
    assert "r_random" in lines[0] and "discover.method_config.plateau_window" in lines[0] and "defaults" in lines[0]
    assert "retired_knob" in lines[0] and "no longer exist" in lines[0]
    assert "resuming the run" in err and "discover ..." not in err and (run / "metrics.json").is_file()


def test_a_field_missing_from_the_saved_config_must_be_at_its_default(old, capsys):
    """Absent from the saved run means it ran with the default: a non-default value now differs."""
    _edit(old / "run_finished" / "config.json", lambda d: d["config"].pop("max_new_tokens"))
    assert RunConfig().max_new_tokens != 4
    assert main(ARGV + ["--out", "run_finished"]) == 2  # ARGV sets --max-new-tokens 4
    assert f"max_new_tokens: saved {RunConfig().max_new_tokens}, now 4" in capsys.readouterr().err


def test_a_run_folder_of_a_newer_format_says_upgrade(old, capsys):
    def newer(d):
        d.update(config_format=CONFIG_FORMAT + 1, steerscope_version="9.1.0")
        d["config"]["brand_new"] = {"x": 1}

    _edit(old / "run_finished" / "config.json", newer)
    assert main(ARGV + ["--out", "run_finished"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"written by steerscope 9.1.0, newer than this one ({__version__}): upgrade steerscope" in err[0]
    )
    with pytest.raises(ss.SteerscopeError, match="upgrade steerscope"):
        JobFolder.check(old / "run_finished", "run", RunConfig())


def test_a_new_job_folder_records_its_versions(tmp_path):
    cfg = RunConfig(n_train=3)
    JobFolder(tmp_path / "j", "run", cfg)
    saved = json.loads((tmp_path / "j" / "config.json").read_text())
    assert (saved["steerscope_version"], saved["config_format"]) == (__version__, CONFIG_FORMAT)
    assert saved["config"] == config_to_dict(cfg)
    assert JobFolder(tmp_path / "j", "run", cfg).resumed
    with pytest.raises(ss.SteerscopeError, match=r"n_train: saved 3, now 4"):
        JobFolder(tmp_path / "j", "run", cfg.replace(n_train=4))


# ---- configs and keys -----------------------------------------------------------------------------
def _with_new_field(base: type, **new) -> type:
    """`base` as it would be once a field is added (same class name: what keys and 0.2.0 files see)."""
    cls = dataclasses.make_dataclass(
        base.__name__, [(k, type(f.default), f) for k, f in new.items()], bases=(base,), frozen=True
    )
    cls.__module__ = base.__module__
    return cls


def test_config_from_dict_fills_missing_fields_and_names_unknown_ones(capsys):
    d = config_to_dict(RunConfig(n_train=3))
    del d["n_heldout"], d["discover"]["n_vectors"]
    d["gone"] = 1
    cfg = config_from_dict(RunConfig, d)
    assert (
        cfg.n_train == 3
        and cfg.n_heldout == RunConfig().n_heldout
        and cfg.discover.n_vectors == DiscoverConfig().n_vectors
    )
    [line] = _warnings(capsys.readouterr().err)
    assert "n_heldout" in line and "discover.n_vectors" in line and "gone" in line
    _, filled, unknown = load_config(RunConfig, config_to_dict(RunConfig()))
    assert filled == unknown == []


def test_a_field_whose_default_changed_behaviour_fills_old_configs_with_its_before_value():
    New = _with_new_field(MelboConfig, fast=dataclasses.field(default=True, metadata={"before": False}))
    cfg, filled, _ = load_config(New, config_to_dict(MelboConfig()))
    assert cfg.fast is False and filled == ["fast"]


def test_a_defaulted_new_field_changes_no_checkpoint_key():
    New = _with_new_field(MelboConfig, knob=dataclasses.field(default=3))
    key = lambda mc: config_key("fp", ["Hi"], DiscoverConfig(method="melbo", method_config=mc))  # noqa: E731
    assert key(New()) == key(MelboConfig())  # added at its default: the 0.2.0 key
    assert key(New(knob=4)) != key(MelboConfig())  # set: another job
    assert key(MelboConfig(steps=7)) != key(MelboConfig())
    # a 0.2.0 field is always hashed, even at its default (so 0.2.0's keys stay valid)
    assert "steps" in key_settings(MelboConfig()) and "knob" not in key_settings(New())
    Changed = _with_new_field(MelboConfig, fast=dataclasses.field(default=True, metadata={"before": False}))
    assert key(Changed()) != key(MelboConfig()) and key(Changed(fast=False)) == key(MelboConfig())
