"""Formatting shared by the README's result tables (benchmarks/readme_tables.py and the modules
whose tables it renders): numbers as the README writes them, a markdown table, a results file."""

from __future__ import annotations

import json
from pathlib import Path


class TableError(Exception):
    """A results file or marker the tables need is missing or malformed."""


def pct(x: float) -> str:
    return f"{round(100 * x)} %"  # round half to even: 12.5 -> 12, 37.5 -> 38, as the README has them


def short(x: float) -> str:
    """Two decimals, trailing zeros dropped: 1.0 -> 1, 0.8409 -> 0.84."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def seconds_range(xs) -> str:
    lo, hi = round(min(xs)), round(max(xs))
    return f"{lo} s" if lo == hi else f"{lo}–{hi} s"


def bold_runs(xs: list[int], at_least: int = 2) -> str:
    """'a / b / c' with each run of values >= at_least in bold: [2, 2, 0] -> '**2 / 2** / 0'."""
    out, run = [], []
    for x in xs + [None]:
        if x is not None and x >= at_least:
            run.append(str(x))
            continue
        if run:
            out.append("**" + " / ".join(run) + "**")
            run = []
        if x is not None:
            out.append(str(x))
    return " / ".join(out)


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def load(results: Path, name: str):
    path = results / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TableError(f"cannot read {path} ({e}); run the benchmark that writes it, or restore it from git") from e


def one(rows: list[dict], what: str, **keys) -> dict:
    hit = [r for r in rows if all(r.get(k) == v for k, v in keys.items())]
    if len(hit) != 1:
        raise TableError(
            f"{what}: {len(hit)} rows match {keys} in the results file, expected 1; fix the row rule in "
            "benchmarks/readme_tables.py"
        )
    return hit[0]
