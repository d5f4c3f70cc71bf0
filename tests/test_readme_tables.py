"""README result tables are rendered from benchmarks/results/*.json (benchmarks/readme_tables.py):
the check passes on the repository as committed, and fails with a diff when a result changes."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)


def test_readme_tables_match_the_results_files(capsys):
    assert rt.main(["--check"]) == 0, capsys.readouterr().out


def _copy(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    return results, readme


@pytest.mark.parametrize(
    "file,change,before,after",
    [
        ("serve.json", lambda d: d[rt.SERVE_KEY]["rows"][1]["distinct"].update(tok_s=71.25), "| 68.5 |", "| 71.2 |"),
        (
            "planted.json",
            lambda d: next(
                r
                for r in d["results"]
                if r.get("split") == "heldout" and r["organism"] == "ocean" and r["model"] == "organism"
            ).update(learned=0.25),
            "| ocean | topic | 0 % |",
            "| ocean | topic | **25 %** |",
        ),
        (
            "kl_candidates.json",
            lambda d: next(r for r in d if r["organism"] == "refuse" and r["seed"] == 2 and r["source"] == 16).update(
                pool=3
            ),
            "| 0 / 0 / 0 | 2 / 2 / 1 |",
            "| 0 / 0 / 3 | 2 / 2 / 1 |",
        ),
        (
            "planted_direction.json",
            lambda d: d["results"][0]["output_kl"].update(trigger=0.5),
            "0.369 / 0.478",
            "0.500 / 0.478",
        ),
        (
            "organisms.json",
            lambda d: next(r for r in d["results"] if r["organism"] == "refuse")["organism_without_trigger"].update(
                rate=0.05, hits=2
            ),
            "| 2 % (1 of 40) | 98 % |",
            "| 5 % (2 of 40) | 98 % |",
        ),
        (
            "binding.json",
            lambda d: d["results"]["binding"].update(fvu=0.05),
            "| binding | 512 | 479,232 | 16 | 0.030 |",
            "| binding | 512 | 479,232 | 16 | 0.050 |",
        ),
        (
            "binding_warm_start.json",
            lambda d: next(r for r in d["results"] if r["seed"] == 1 and r["sae"] == "topk 800").update(FVU=0.3),
            "| 0.174 / 0.206 / 0.198 / 0.192 / 0.204 / 0.200 |",
            "| 0.174 / 0.300 / 0.198 / 0.192 / 0.204 / 0.200 |",
        ),
    ],
)
def test_a_changed_number_in_a_results_file_fails_the_check_and_the_rewrite_fixes_it(
    tmp_path, capsys, file, change, before, after
):
    results, readme = _copy(tmp_path)
    data = json.loads((results / file).read_text())
    change(data)
    (results / file).write_text(json.dumps(data))
    args = ["--readme", str(readme), "--results", str(results)]
    assert rt.main(args + ["--check"]) == 1
    diff = capsys.readouterr().out
    assert any(l.startswith("-") and before in l for l in diff.splitlines()), diff
    assert any(l.startswith("+") and after in l for l in diff.splitlines()), diff
    assert readme.read_text() == (ROOT / "README.md").read_text()  # --check writes nothing
    assert rt.main(args) == 0 and after in readme.read_text() and rt.main(args + ["--check"]) == 0
    # only the table changed: the text around the markers is the same
    old, new = (ROOT / "README.md").read_text().splitlines(), readme.read_text().splitlines()
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new)) == 1


def test_missing_marker_or_results_file_is_one_line_and_exit_2(tmp_path, capsys):
    results, readme = _copy(tmp_path)
    readme.write_text(readme.read_text().replace("<!-- table:serve -->", ""))
    assert rt.main(["--readme", str(readme), "--results", str(results), "--check"]) == 2
    assert "serve" in capsys.readouterr().err
    results, readme = _copy(tmp_path / "b")
    (results / "kl_candidates.json").unlink()
    assert rt.main(["--readme", str(readme), "--results", str(results), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "kl_candidates.json" in err
