"""Grid sweeps: many jobs (run, discover, SAE training) over a grid of settings, as Ray tasks.

A grid file (YAML or JSON) names a command and its flags::

    command: run                   # run | discover | sae train | extract | ...
    base: {model: "organism:french", n-train: 4}
    grid: {method: [dct, melbo], R: [2, 4]}    # every combination is one point
    resources: {num_cpus: 1, num_gpus: 0, memory_gb: 4}
    max_retries: 2                 # a point whose worker dies is retried this often

Keys are the command's flags without `--` (the same names as on the command line, so a grid
is validated by the command's own parser before anything runs); lists in `base` are
comma-joined, true/false give --flag/--no-flag. Each point is one job folder,
`OUT/points/<key>/out`, run by the command itself, so a rerun skips finished points and an
interrupted point resumes from its own checkpoint. Ray runs the points (a local instance, or a
cluster at `--address`); a point that raises is reported with its error and never stops the
others; a point whose worker process dies is retried by Ray (`max_retries`).

The sweep's state is `OUT/sweep.json` (written atomically after every event) and
`OUT/sweep.html`, the merged report (`report.grid_sweep`).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._io import write_json_atomic, write_text_atomic
from ..errors import SteerscopeError
from ..progress import bar as progress_bar
from ..report.grid_sweep import render_sweep

STATE = "sweep.json"
REPORT = "sweep.html"


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gb: float | None = None


@dataclass(frozen=True)
class GridSpec:
    command: str
    base: dict[str, Any]
    grid: dict[str, list]
    resources: Resources = field(default_factory=Resources)
    max_retries: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Point:
    key: str  # folder name, e.g. "method=dct,R=2"
    values: dict[str, Any]  # the swept flags' values at this point
    argv: list[str]  # the command's flags, without --out


def load_grid(path: str | Path) -> GridSpec:
    """Read and check a grid file (every problem in one line)."""
    p = Path(path)
    if not p.is_file():
        raise SteerscopeError(f"grid file {p} does not exist.")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:
        raise SteerscopeError(
            f"{p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {' '.join(str(e).split())}"
        ) from None
    if not isinstance(raw, dict):
        raise SteerscopeError(f"{p} must hold a mapping with command, base and grid.")
    unknown = set(raw) - {"command", "base", "grid", "resources", "max_retries"}
    if unknown:
        raise SteerscopeError(f"{p}: unknown keys {sorted(unknown)}; use command, base, grid, resources, max_retries.")
    cmd, base, grid = raw.get("command"), raw.get("base") or {}, raw.get("grid") or {}
    if not isinstance(cmd, str) or not cmd:
        raise SteerscopeError(f"{p}: `command` must name a steerscope command, e.g. run or discover.")
    if not isinstance(base, dict) or not isinstance(grid, dict) or not grid:
        raise SteerscopeError(f"{p}: `base` must be a mapping and `grid` a non-empty mapping of flag: [values].")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SteerscopeError(f"{p}: grid entry {k!r} must be a non-empty list of values.")
    both = set(base) & set(grid)
    if both or "out" in base or "out" in grid:
        raise SteerscopeError(f"{p}: {sorted(both) or ['out']} cannot be in base and grid (out is set per point).")
    res = raw.get("resources") or {}
    try:
        resources = Resources(**res)
    except TypeError:
        raise SteerscopeError(f"{p}: resources takes num_cpus, num_gpus and memory_gb.") from None
    retries = raw.get("max_retries", 2)
    if not isinstance(retries, int) or not 0 <= retries <= 10:
        raise SteerscopeError(f"{p}: max_retries must be an integer in 0..10.")
    return GridSpec(cmd, base, grid, resources, retries)


def flag_args(mapping: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in mapping.items():
        flag = "--" + str(k).lstrip("-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + flag[2:])
        elif isinstance(v, list):
            out += [flag, ",".join(str(x) for x in v)]
        else:
            out += [flag, str(v)]
    return out


def _slug(values: dict[str, Any]) -> str:
    s = ",".join(f"{k}={v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", s)[:120]


def expand(spec: GridSpec) -> list[Point]:
    keys = list(spec.grid)
    points = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        points.append(Point(_slug(values), values, flag_args(spec.base) + flag_args(values)))
    if len({p.key for p in points}) != len(points):
        raise SteerscopeError("two grid points map to the same folder name; make the values distinct.")
    return points


# ---- headline metrics of one finished point (read from its job folder) --------------------------------
def _run_headline(out: Path) -> dict[str, float]:
    m = json.loads((out / "metrics.json").read_text())
    s = m.get("summary", {})
    h = {"findings": len(m.get("findings") or []), "seconds": m.get("seconds")}
    for kind in ("learned", "random"):
        for k in ("clusters", "mean_target_change", "mean_kl_neutral", "mean_embed_distance"):
            if k in s.get(kind, {}):
                h[f"{kind}_{k}"] = s[kind][k]
    return h


def _vectors_headline(out: Path) -> dict[str, float]:
    c = json.loads((out / "config.json").read_text())
    norms = c.get("norms") or [0.0]
    return {"vectors": len(c.get("ids", [])), "mean_norm": sum(norms) / len(norms)}


def _sae_headline(out: Path) -> dict[str, float]:
    t = json.loads((out / "training.json").read_text())
    last = {k: v[-1] for k, v in t.items() if isinstance(v, list) and v and isinstance(v[-1], (int, float))}
    return {k: last[k] for k in list(last)[:6]}


def _bench_headline(out: Path) -> dict[str, float]:
    """Mean score and concept rate per method at the matched KL (so a sweep over --target, --layer
    or --model plots each method's line)."""
    acc: dict[str, list[float]] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("multiplier") == 1.0 and r["measure"] in ("score", "concept_rate") and r["value"] is not None:
            acc.setdefault(f"{r['method']}_{r['measure']}", []).append(r["value"])
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


HEADLINES: dict[str, Callable[[Path], dict[str, float]]] = {
    "bench": _bench_headline,
    "run": _run_headline,
    "discover": _vectors_headline,
    "extract": _vectors_headline,
    "sae train": _sae_headline,
}


def headline(command: str, out: Path) -> dict[str, float]:
    fn = HEADLINES.get(command)
    if fn is None or not out.exists():
        return {}
    try:
        return {k: v for k, v in fn(out).items() if isinstance(v, (int, float))}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ---- state -------------------------------------------------------------------------------------------
class SweepState:
    """`OUT/sweep.json`: the grid and every point's status (pending/running/done/failed)."""

    def __init__(self, out: Path, spec: GridSpec, points: list[Point], force: bool = False):
        self.out, self.spec = out, spec
        path = out / STATE
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None and old.get("grid") != spec.to_dict() and not force:
            raise SteerscopeError(f"{out} holds a sweep over another grid; choose another --out or pass --force.")
        if old is None and out.exists() and any(out.iterdir()) and not force:
            raise SteerscopeError(f"{out} exists and is not a steerscope sweep; choose another --out or pass --force.")
        prev = (old or {}).get("points", {}) if old is not None and old.get("grid") == spec.to_dict() else {}
        self.points = {
            p.key: {
                "values": p.values,
                "status": "done" if prev.get(p.key, {}).get("status") == "done" else "pending",
                **{
                    k: v
                    for k, v in prev.get(p.key, {}).items()
                    if k in ("seconds", "headline", "attempts", "has_report") and prev[p.key].get("status") == "done"
                },
            }
            for p in points
        }
        self.started = time.time()
        self.save()

    def point_dir(self, key: str) -> Path:
        return self.out / "points" / key

    def counts(self) -> dict[str, int]:
        c = {"pending": 0, "running": 0, "done": 0, "failed": 0}
        for p in self.points.values():
            c[p["status"]] += 1
        return c

    def eta_seconds(self) -> float | None:
        done = [p["seconds"] for p in self.points.values() if p["status"] == "done" and p.get("seconds")]
        left = sum(p["status"] in ("pending", "running") for p in self.points.values())
        if not done or not left:
            return None if left else 0.0
        running = max(1, sum(p["status"] == "running" for p in self.points.values()))
        return sum(done) / len(done) * left / running

    def save(self) -> None:
        write_json_atomic(
            self.out / STATE,
            {
                "grid": self.spec.to_dict(),
                "points": self.points,
                "counts": self.counts(),
                "eta_seconds": self.eta_seconds(),
                "updated": time.time(),
            },
        )


# ---- the executor ----------------------------------------------------------------------------------
def run_sweep(
    spec: GridSpec,
    points: list[Point],
    out: Path,
    task,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> SweepState:
    """Run every unfinished point as a Ray task `task(command, argv, point_dir) -> dict` and keep
    `sweep.json` / `sweep.html` current. Returns the final state."""
    import ray

    out.mkdir(parents=True, exist_ok=True)
    state = SweepState(out, spec, points, force)
    todo = [p for p in points if state.points[p.key]["status"] != "done"]

    def write() -> None:
        state.save()
        write_text_atomic(
            out / REPORT,
            render_sweep(
                spec.to_dict(), state.points, state.counts(), state.eta_seconds(), time.time() - state.started
            ),
        )

    for p in todo:  # a marker left by a killed earlier sweep would read as "running"
        (state.point_dir(p.key) / "sweep_running.json").unlink(missing_ok=True)
    write()
    if not todo:
        return state
    started_here = not ray.is_initialized()
    if started_here:
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
        if address is None and num_cpus is not None:
            kw["num_cpus"] = num_cpus
        ray.init(address=address, **kw)
    r = spec.resources
    opts: dict[str, Any] = {
        "num_cpus": r.num_cpus,
        "num_gpus": r.num_gpus,
        "max_retries": spec.max_retries,
        "retry_exceptions": False,
    }
    if r.memory_gb:
        opts["memory"] = int(r.memory_gb * 2**30)
    remote = ray.remote(task).options(**opts)
    refs = {remote.remote(spec.command, p.argv, str(state.point_dir(p.key))): p for p in todo}
    bar = progress_bar(len(points), "sweep", "point", show=progress, initial=len(points) - len(todo))
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=2.0)
            for p in todo:  # running = its worker has written the marker
                st = state.points[p.key]
                if st["status"] == "pending" and (state.point_dir(p.key) / "sweep_running.json").is_file():
                    st["status"] = "running"
            for ref in done:
                p = refs.pop(ref)
                st = state.points[p.key]
                try:
                    res = ray.get(ref)
                except Exception as e:  # the worker died more than max_retries times, or Ray failed
                    res = {"code": -1, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
                attempts = state.point_dir(p.key) / "sweep_attempts.log"
                st["attempts"] = len(attempts.read_text().splitlines()) if attempts.is_file() else 0
                st["seconds"] = res.get("seconds")
                if res.get("code") == 0:
                    st["status"] = "done"
                    st["headline"] = headline(spec.command, state.point_dir(p.key) / "out")
                    st["has_report"] = (state.point_dir(p.key) / "out" / "report.html").is_file()
                    st.pop("error", None)
                else:
                    st["status"] = "failed"
                    st["error"] = res.get("error") or f"exit status {res.get('code')}"
                bar.update(1)
            c = state.counts()
            bar.set_postfix(running=c["running"], failed=c["failed"])
            write()
    finally:
        bar.close()
        for ref in refs:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
        for st in state.points.values():
            if st["status"] == "running":
                st["status"] = "pending"
        write()
    return state
