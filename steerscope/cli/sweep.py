"""`steerscope sweep --grid GRID.yaml --out DIR`: a grid of jobs as Ray tasks (see `jobs.grid_sweep`)."""

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import SteerscopeError
from ._args import Parser, add_config_args, config_from_args
from ._registry import COMMANDS, command, dispatch, say


@dataclass(frozen=True)
class GridSweepCommand(Config):
    grid: str = field(default="", metadata={"required": True})
    """a YAML or JSON grid file: command, base flags, grid of flag values, resources, max_retries"""
    out: str = field(default="", metadata={"required": True})
    """sweep folder: sweep.json, sweep.html and one job folder per point under points/; a rerun resumes"""
    address: str | None = field(default=None, metadata={"none": "local"})
    """Ray cluster: local (start a Ray instance here), auto (the running local cluster) or ray://HOST:PORT"""
    num_cpus: int | None = field(default=None, metadata={"min": 1})
    """CPUs of the local Ray instance (default: all)"""
    force: bool = False
    """replace a sweep folder that holds another grid"""


class _Check(Parser):
    """The command's own parser, but an error raises (naming the grid point) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise SteerscopeError(message)


def check_point(name: str, argv: list[str], key: str) -> None:
    """Parse and validate one point's flags exactly as `steerscope NAME` would."""
    cmd = COMMANDS[name]
    p = _Check(prog=f"steerscope {name}")
    add_config_args(p, cmd.default())
    try:
        config_from_args(cmd.default(), p.parse_args(argv))
    except SteerscopeError as e:
        raise SteerscopeError(f"grid point {key}: {e}") from None


def run_point(name: str, argv: list[str], point_dir: str) -> dict:
    """One grid point, in a Ray worker: `steerscope NAME ARGV --out POINT/out`, its output in
    POINT/sweep_log.txt. Markers: sweep_running.json (pid, while it runs) and one line per
    attempt in sweep_attempts.log."""
    import contextlib
    import json
    import os
    import time

    p = Path(point_dir)
    p.mkdir(parents=True, exist_ok=True)
    (p / "sweep_running.json").write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
    node = "-"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - only a label
        pass
    with open(p / "sweep_attempts.log", "a") as f:
        f.write(f"{time.time():.0f} pid {os.getpid()} node {node}\n")
    t0 = time.time()
    with open(p / "sweep_log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = dispatch([*name.split(), *argv, "--out", str(p / "out")])
        except BaseException as e:  # noqa: BLE001 - a point's crash is its result
            print(f"steerscope: error: {type(e).__name__}: {e}", file=log)
            code = 1
    (p / "sweep_running.json").unlink(missing_ok=True)
    error = None
    if code != 0:
        lines = [l for l in (p / "sweep_log.txt").read_text().splitlines() if l.strip()]
        error = next(
            (l for l in reversed(lines) if "error" in l.lower()), lines[-1] if lines else f"exit status {code}"
        )
    return {"code": code, "seconds": round(time.time() - t0, 2), "error": error}


@command(
    "sweep",
    "a grid of jobs (run, discover, SAE training, ...) as Ray tasks, with one merged report",
    "Run a command over a grid of flag values as Ray tasks (local, or a cluster with --address); each point is "
    "one job folder, a rerun skips finished points and resumes interrupted ones; OUT/sweep.html is the merged "
    "report. The norm sweep of a vector is `steerscope norm-sweep`.",
    GridSweepCommand,
)
def cmd_grid_sweep(cfg: GridSweepCommand) -> int:
    from ..jobs.grid_sweep import expand, load_grid, run_sweep

    spec = load_grid(cfg.grid)
    if spec.command not in COMMANDS or spec.command in ("sweep", "serve"):
        runnable = ", ".join(sorted(n for n in COMMANDS if n not in ("sweep", "serve", "info")))
        raise SteerscopeError(f"grid command {spec.command!r} cannot be swept; use one of: {runnable}.")
    points = expand(spec)
    out = Path(cfg.out)
    for pt in points:  # every point's flags checked before anything starts
        check_point(spec.command, pt.argv + ["--out", str(out / "points" / pt.key / "out")], pt.key)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SteerscopeError("sweeps run on Ray: pip install 'steerscope[sweep]' (or pip install ray).") from None
    say(f"sweep: {len(points)} points of `steerscope {spec.command}` -> {out}/sweep.html")
    state = run_sweep(spec, points, out, run_point, address=cfg.address, num_cpus=cfg.num_cpus, force=cfg.force)
    c = state.counts()
    say(f"sweep: {c['done']} done, {c['failed']} failed, {c['pending']} not run; report: {out / 'sweep.html'}")
    for key, st in state.points.items():
        if st["status"] == "failed":
            say(f"  failed {key}: {st.get('error')}")
    return 0 if c["failed"] == 0 and c["pending"] == 0 else 1
