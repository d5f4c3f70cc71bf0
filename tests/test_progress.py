"""Progress: bars with an ETA on a terminal, throttled plain lines elsewhere, the job log, and
nothing on stdout."""

from __future__ import annotations

import re
import time

import pytest
from conftest import make_tiny_lm

import steerscope.progress as progress
from steerscope.checkpoint import JobFolder
from steerscope.directions.discovery import DiscoverConfig, discover
from steerscope.generation import generate
from steerscope.jobs.stages import Stage, run_stages
from steerscope.progress import Bar, bar, job_log, note, say

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class Clock:
    """A clock the test moves by hand (progress reads time.monotonic and time.strftime)."""

    def __init__(self):
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def strftime(self, fmt: str) -> str:
        return time.strftime(fmt)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress, "time", c)
    return c


def _lines(text: str) -> list[str]:
    return [l.strip() for l in text.splitlines() if l.strip()]


def test_plain_lines_carry_the_eta_and_come_every_ten_percent(capsys, clock):
    with bar(100, "training", "step") as b:
        clock.t += 3  # past the delay before the first step ends
        for _ in range(100):
            clock.t += 1
            b.update(1)
    cap = capsys.readouterr()
    assert cap.out == ""  # stdout is for results
    lines = _lines(cap.err)
    # the first line once the delay has passed, one at each further 10 %, and the end
    assert lines[0].startswith("training: 1/100 steps (1%), 4s elapsed, ETA 6m36s")  # 99 left at 4 s a step
    assert lines[1].startswith("training: 10/100 steps (10%), 13s elapsed, ETA 1m57s")
    assert len(lines) == 11 and lines[-1] == "training: done, 100 steps in 1m43s"
    assert all("ETA" in l for l in lines[:-1])


def test_a_line_every_30_seconds_when_steps_are_slow(capsys, clock):
    with bar(1000, "slow", "row") as b:
        for _ in range(9):  # 9 steps of 20 s: under 1 %, so only the clock triggers lines
            clock.t += 20
            b.update(1)
    lines = _lines(capsys.readouterr().err)
    # at 20 s (past the delay), then 60 s and 100 s, 140 s, 180 s (each >= 30 s after the last), and the end
    assert [re.search(r"(\d+)/1000", l).group(1) for l in lines[:-1]] == ["1", "3", "5", "7", "9"]
    assert lines[-1].startswith("slow: done, 9 rows in 3m00s")


def test_a_quick_loop_and_an_empty_one_print_nothing(capsys):
    with bar(10_000, "quick") as b:
        for _ in range(10_000):
            b.update(1)
    with bar(0, "empty") as b:
        b.update(0)
    assert b._timer is None  # nothing armed either
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""


def test_many_fast_steps_do_not_spam(capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    with bar(50_000, "fast") as b:
        for _ in range(50_000):
            b.update(1)
    lines = _lines(capsys.readouterr().err)
    assert 2 <= len(lines) <= 12 and lines[-1].startswith("fast: done, 50000 steps")


def test_the_silence_of_a_slow_first_step_is_broken(capsys):
    """No step has finished, yet a line comes once the delay has passed (a timer, not an update)."""
    b = Bar(5, "calibrating R", "pass", delay=0.1)
    time.sleep(0.6)
    b.close()
    lines = _lines(capsys.readouterr().err)
    assert lines[0].startswith("calibrating R: 0/5 passes (0%)") and "ETA unknown" in lines[0]
    assert lines[-1].startswith("calibrating R: done, 0 passes")


def test_show_false_is_silent_everywhere(capsys, tmp_path, clock):
    log = tmp_path / "log.txt"
    with job_log(log), bar(10, "inner", show=False) as b:
        clock.t += 100
        b.update(10)
    assert capsys.readouterr().err == "" and not log.exists()


def test_the_job_log_gets_the_same_lines_with_timestamps_and_is_appended(capsys, tmp_path, clock):
    log = tmp_path / "out" / "log.txt"
    with job_log(log):
        say("steerscope run: generating 20 completions")
        with bar(20, "generating", "row") as b:
            clock.t += 5
            b.update(10)
            clock.t += 5
            b.update(10)
    first = log.read_text().splitlines()
    assert re.fullmatch(STAMP + r" steerscope run: generating 20 completions", first[0])
    assert re.fullmatch(STAMP + r"   generating: 10/20 rows \(50%\), 5s elapsed, ETA 5s", first[1])
    assert re.fullmatch(STAMP + r"   generating: done, 20 rows in 10s", first[2])
    err = _lines(capsys.readouterr().err)
    assert err == [
        "steerscope run: generating 20 completions",
        "generating: 10/20 rows (50%), 5s elapsed, ETA 5s",
        "generating: done, 20 rows in 10s",
    ]
    with job_log(log):  # a resumed job appends
        note("resumed")
    assert log.read_text().splitlines()[:3] == first and log.read_text().splitlines()[3].endswith(" resumed")
    note("no job active")  # goes nowhere
    assert len(log.read_text().splitlines()) == 4


def test_on_a_terminal_the_bar_is_tqdm_on_stderr_and_the_log_still_gets_lines(capsys, tmp_path, monkeypatch, clock):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    log = tmp_path / "log.txt"
    with job_log(log), bar(4, "melbo", "step") as b:
        for _ in range(4):
            clock.t += 10
            b.update(1)
        b._tqdm.refresh()  # tqdm keeps its own clock and delay: draw now
    cap = capsys.readouterr()
    assert cap.out == ""
    assert "melbo" in cap.err and "\r" in cap.err  # tqdm's redrawn line
    assert not re.search(r"^  melbo: ", cap.err, re.M)  # no plain lines on a terminal
    lines = log.read_text().splitlines()
    assert "melbo: 1/4 steps (25%), 10s elapsed, ETA 30s" in lines[0] and "done, 4 steps in 40s" in lines[-1]


def test_stage_boundaries_go_to_the_job_log(tmp_path, capsys):
    folder = JobFolder(tmp_path / "job", "demo", {"a": 1})

    class Ctx:
        artifacts: dict = {}

    stages = [
        Stage("first", "first.txt", lambda ctx: "x", lambda a, p: p.write_text(a), lambda p, ctx: p.read_text()),
        Stage("second", None, lambda ctx: 2),
    ]
    run_stages(folder, stages, Ctx())
    log = (tmp_path / "job" / "log.txt").read_text()
    assert "=== demo started in" in log and "steerscope demo: first ..." in log
    assert (
        re.search(r"steerscope demo: first: computed in \d+s", log)
        and "=== demo finished: 2 stages computed, 0 reused" in log
    )
    folder2 = JobFolder(tmp_path / "job", "demo", {"a": 1})

    def boom(ctx):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run_stages(folder2, [stages[0], Stage("second", None, boom)], Ctx())
    again = (tmp_path / "job" / "log.txt").read_text()
    assert again.startswith(log)  # appended
    tail = again[len(log) :]
    assert "=== demo resumed in" in tail and "first: reused from first.txt" in tail
    assert "second: stopped after 0s (RuntimeError: out of memory)" in tail
    assert capsys.readouterr().out == ""


def test_discovery_and_generation_report_progress_off_a_terminal(capsys, monkeypatch, tmp_path):
    """The real loops: calibration, training and generation each print lines with an ETA on a
    non-terminal stderr and write them to an active job log; stdout stays empty."""
    monkeypatch.setattr(progress, "DELAY", 0.0)
    lm = make_tiny_lm("llama")
    log = tmp_path / "log.txt"
    with job_log(log):
        vs = discover(
            lm, ["Hello there", "The cat sat"], DiscoverConfig.of("melbo", source=0, target=2, n_vectors=2, steps=6)
        )
        generate(lm, ["Hi"], vectors=vs, max_new_tokens=2, batch_size=1)  # 3 rows, 3 steps
    cap = capsys.readouterr()
    assert cap.out == ""
    for what in ("calibrating R: ", "melbo: ", "generating: "):
        assert re.search(rf"^  {what}\d+/\d+ \w+ \(\d+%\), \d+s elapsed, ETA ", cap.err, re.M), what
        assert re.search(rf"^  {what}done, ", cap.err, re.M), what
    assert re.search(STAMP + r"   melbo: \d+/6 steps .*ETA", log.read_text())
    generate(lm, ["Hi"], max_new_tokens=2, progress=False)  # progress=False: nothing
    assert capsys.readouterr().err == ""
