"""A run's findings as vector sets: `steerscope findings RUN --export N --out DIR`.

The measure stage stores the ranked findings (`judging.findings`) in metrics.json; exporting one
writes the learned vectors that elicit it as an ordinary vector folder, usable by `generate`,
`select`, `export` and `sweep`, with the finding (words, typical completion, run) recorded in its
hyper-parameters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..directions.vectors import VectorSet
from ..errors import SteerscopeError


def load_findings(run_dir: str | Path) -> list[dict]:
    run = Path(run_dir)
    metrics = run / "metrics.json"
    if not metrics.is_file():
        raise SteerscopeError(
            f"{run} is not a finished run folder (no metrics.json); run `steerscope run --out {run}` to finish it."
        )
    m = json.loads(metrics.read_text())
    if "findings" not in m:
        raise SteerscopeError(f"{run} was measured by an older steerscope without findings; rerun it with --force.")
    return m["findings"]


def export_finding(run_dir: str | Path, rank: int, out: str | Path, *, overwrite: bool = False) -> VectorSet:
    """Write the vectors eliciting finding `rank` (0 = the report's first) to `out`."""
    run = Path(run_dir)
    found = load_findings(run)
    if not found:
        raise SteerscopeError(
            f"{run} has no findings (no cluster held a learned-vector completion); export "
            "vectors by id with `steerscope export` instead."
        )
    if not 0 <= rank < len(found):
        raise SteerscopeError(f"{run} has findings 0..{len(found) - 1}; --export {rank} is not one of them.")
    f = found[rank]
    vs = VectorSet.load(run / "vectors" / "learned")
    idx = [vs.ids.index(v) for v in f["vectors"]]
    cfg = dataclasses.replace(
        vs.config,
        ids=[vs.ids[i] for i in idx],
        layers=[vs.layers[i] for i in idx],
        norms=[vs.config.norms[i] for i in idx],
        hyperparams={
            **vs.config.hyperparams,
            "finding": {
                "run": str(run.resolve()),
                "rank": rank,
                "words": f["words"],
                "surface": f.get("surface", ""),
                "typical": f["typical"],
                "n_vectors": f["n_vectors"],
            },
        },
    )
    sub = VectorSet(vs.vectors[idx].clone(), cfg)
    sub.save(out, overwrite=overwrite)
    return sub
