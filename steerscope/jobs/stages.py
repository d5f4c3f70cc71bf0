"""Stages: the building blocks of a job.

A stage has a name, an artifact path inside the job folder, and three functions: `build(ctx)`
makes the artifact from what earlier stages left in `ctx`, `save(artifact, path)` writes it
atomically, `load(path, ctx)` reads it back. `run_stages` skips a stage whose artifact exists (so a
killed job resumes where it stopped) and never rebuilds what an earlier stage built: everything
passes through the context.

While the stages run, the folder's job log (OUT/log.txt, `progress.job_log`) is active: every
progress bar inside writes its throttled lines there, and each stage boundary (reused from its
artifact, or computed and how long it took) is logged. A resumed job appends to the same file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import JobFolder
from ..progress import LOG_NAME, duration, job_log, note, say


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
    """Run the stages in order; ctx.artifacts[name] holds each stage's artifact afterwards.
    `log(msg)`: the job's messages (default: `progress.say`, stderr and the job log)."""
    log = log or (lambda m: say(f"steerscope {folder.kind}: {m}"))
    out = StageLog()
    with job_log(folder.path(LOG_NAME)):
        note(f"=== {folder.kind} {'resumed' if folder.resumed else 'started'} in {folder.out} ===")
        for st in stages:
            path = folder.path(st.path) if st.path else None
            if path is not None and path.exists() and st.load is not None:
                ctx.artifacts[st.name] = st.load(path, ctx)
                out.reused.append(st.name)
                log(f"{st.name}: reused from {st.path}")
                continue
            t0 = time.perf_counter()
            log(f"{st.name} ...")
            try:
                artifact = st.build(ctx)
                if path is not None:
                    st.save(artifact, path)
            except BaseException as e:  # the log says where a job stopped, and why
                note(
                    f"{st.name}: stopped after {duration(time.perf_counter() - t0)} "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                )
                raise
            ctx.artifacts[st.name] = artifact
            out.done.append(st.name)
            out.seconds[st.name] = round(time.perf_counter() - t0, 1)
            log(f"{st.name}: computed in {duration(out.seconds[st.name])}")  # where a job's time goes
        note(
            f"=== {folder.kind} finished: {len(out.done)} stages computed, {len(out.reused)} reused, "
            f"{duration(sum(out.seconds.values()))} ==="
        )
    return out
