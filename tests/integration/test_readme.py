"""The README's examples run: every ```python block (in order, one namespace) and every
`steerscope ...` line of the ```bash blocks, in one scratch folder, on the embedded SmolLM2.
`make ...` lines are the set-up commands themselves and are not run here."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from steerscope.cli import main

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(python|bash)\n(.*?)```", README.read_text(), flags=re.S)


def commands(text: str) -> list[list[str]]:
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()  # drop trailing comments
        if line.startswith("steerscope "):
            out.append(shlex.split(line)[1:])
        elif line and not line.startswith(("make ", "#")):
            raise AssertionError(f"README bash line is neither a steerscope command nor make: {line!r}")
    return out


def test_readme_has_examples():
    kinds = [k for k, _ in blocks()]
    assert kinds.count("python") >= 2 and kinds.count("bash") >= 4


@pytest.mark.timeout(1800)  # every README command in order: 203 s alone on 2 cores, past 600 s when shared
def test_readme_examples_run(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    ns: dict = {}
    try:
        for kind, text in blocks():
            if kind == "python":
                exec(compile(text, "README.md", "exec"), ns)  # noqa: S102
            else:
                for argv in commands(text):
                    code = main(argv)
                    err = capsys.readouterr().err
                    assert code == 0, f"steerscope {' '.join(argv)} exited {code}: {err[-500:]}"
    finally:
        os.chdir(cwd)
    assert (tmp_path / "runs" / "mine" / "report.html").is_file() and (tmp_path / "select.html").is_file()
    assert (tmp_path / "sae" / "L12" / "cfg.json").is_file() and (tmp_path / "vec" / "from-gguf").is_dir()
