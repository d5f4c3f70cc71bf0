"""Stages: the building blocks of a job.

A stage has a name, an artifact path inside the job folder, and three functions: `build(ctx)`
makes the artifact from what earlier stages left in `ctx`, `save(artifact, path)` writes it
atomically, `load(path, ctx)` reads it back. `run_stages` skips a stage whose artifact exists (so a
killed job resumes where it stopped) and never rebuilds what an earlier stage built: everything
passes through the context.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import JobFolder


@dataclass
class Stage:
    name: str
    path: str | None  # artifact path relative to the job folder; None: always rebuilt (e.g. the report)
    build: Callable[[Any], Any]
    save: Callable[[Any, Path], None] = lambda artifact, path: None
    load: Callable[[Path, Any], Any] | None = None  # (path, ctx): the context can check it (e.g. against the model)


@dataclass
class StageLog:
    done: list[str] = field(default_factory=list)  # built in this call
    reused: list[str] = field(default_factory=list)  # loaded from an earlier call
    seconds: dict[str, float] = field(default_factory=dict)


def run_stages(folder: JobFolder, stages: list[Stage], ctx: Any, log: Callable[[str], None] | None = None) -> StageLog:
    """Run the stages in order; ctx.artifacts[name] holds each stage's artifact afterwards."""
    log = log or (lambda m: print(f"steerscope {folder.kind}: {m}", file=sys.stderr, flush=True))
    out = StageLog()
    for st in stages:
        path = folder.path(st.path) if st.path else None
        if path is not None and path.exists() and st.load is not None:
            ctx.artifacts[st.name] = st.load(path, ctx)
            out.reused.append(st.name)
            continue
        t0 = time.perf_counter()
        log(f"{st.name} ...")
        artifact = st.build(ctx)
        if path is not None:
            st.save(artifact, path)
        ctx.artifacts[st.name] = artifact
        out.done.append(st.name)
        out.seconds[st.name] = round(time.perf_counter() - t0, 1)
        if path is not None:  # where a job's time goes, stage by stage
            log(f"{st.name}: {out.seconds[st.name]:g} s")
    return out
