"""`steerscope sweep --grid`: grid files checked before anything runs, and a real multi-node Ray
cluster on loopback (a head and two worker nodes started by the test) running the points, with
one failing point and one worker killed mid-point."""

from __future__ import annotations

import os
import signal
import threading
import time

# Every Ray address on loopback (Ray otherwise advertises the machine's own IP, which a sandbox
# may not route); read when ray is imported, so set before any test imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import json  # noqa: E402

import pytest  # noqa: E402
from conftest import make_tiny_lm  # noqa: E402

from steerscope.cli import main  # noqa: E402
from steerscope.errors import SteerscopeError  # noqa: E402
from steerscope.jobs.grid_sweep import expand, flag_args, load_grid  # noqa: E402
from steerscope.report.grid_sweep import render_sweep  # noqa: E402


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    lm = make_tiny_lm("llama", chat=True)
    lm.model.save_pretrained(d / "ckpt")
    lm.tokenizer.save_pretrained(d / "ckpt")
    (d / "p.txt").write_text("Hello there\nHow are you today\nTell me a story\n")
    return d


def test_grid_expansion_and_flags(tmp_path):
    g = _write(
        tmp_path / "g.json",
        {
            "command": "discover",
            "base": {"R": 1.0, "chat": False, "layers": [1, 2]},
            "grid": {"method": ["dct", "random"], "seed": [0, 1, 2]},
        },
    )
    spec = load_grid(g)
    points = expand(spec)
    assert len(points) == 6 and points[0].key == "method=dct,seed=0" and len({p.key for p in points}) == 6
    assert points[-1].argv == ["--R", "1.0", "--no-chat", "--layers", "1,2", "--method", "random", "--seed", "2"]
    assert flag_args({"force": True}) == ["--force"]


@pytest.mark.parametrize(
    "grid,words",
    [
        ({"command": "discover"}, "non-empty mapping"),
        ({"command": "discover", "grid": {"seed": []}}, "non-empty list"),
        ({"command": "discover", "base": {"seed": 1}, "grid": {"seed": [1, 2]}}, "cannot be in base and grid"),
        ({"command": "discover", "grid": {"seed": [1]}, "resources": {"gpus": 1}}, "num_cpus, num_gpus"),
        ({"command": "discover", "grid": {"seed": [1]}, "retries": 3}, "unknown keys"),
        ({"command": "dream", "grid": {"seed": [1]}}, "cannot be swept"),
        (
            {"command": "discover", "base": {"prompts": "x"}, "grid": {"n-vectors": [2, 0]}},
            "grid point n-vectors=0: --n-vectors must be >= 1",
        ),
        ({"command": "discover", "grid": {"power-iters": [2]}}, "grid point power-iters=2"),
    ],
)
def test_bad_grids_exit_2_with_one_line(tmp_path, capsys, grid, words):
    g = _write(tmp_path / "g.json", grid)
    assert main(["sweep", "--grid", str(g), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not (tmp_path / "out").exists()  # nothing started


def test_yaml_grid_and_broken_file(tmp_path):
    (tmp_path / "g.yaml").write_text("command: discover\ngrid:\n  seed: [0, 1]\n")
    assert len(expand(load_grid(tmp_path / "g.yaml"))) == 2
    (tmp_path / "bad.yaml").write_text("command: [unclosed\n")
    with pytest.raises(SteerscopeError, match="not valid YAML"):
        load_grid(tmp_path / "bad.yaml")


def test_merged_report_renders_progress_table_and_plots():
    grid = {"command": "run", "grid": {"method": ["dct", "melbo"], "R": [1, 4]}}
    pts = {
        f"method={m},R={r}": {
            "values": {"method": m, "R": r},
            "status": "done",
            "seconds": 10.0 * r,
            "attempts": 1,
            "headline": {"findings": r + (m == "melbo"), "seconds": 3.0},
            "has_report": True,
        }
        for m in ("dct", "melbo")
        for r in (1, 4)
    }
    pts["method=melbo,R=4"].update(status="failed", error="steerscope: error: boom", headline={})
    html = render_sweep(grid, pts, {"done": 3, "failed": 1, "running": 0, "pending": 0}, 0.0, 42.0)
    assert html.count('data-status="done"') == 3 and "steerscope: error: boom" in html
    assert 'data-metric="findings" data-field="R"' in html and 'data-metric="seconds"' not in html  # constant: no plot
    assert "3 done · 0 running · 1 failed" in html and "finished" in html


def _cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    for _ in range(2):
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    return ray, c


def test_sweep_on_a_local_ray_cluster_with_a_failure_and_a_killed_worker(ckpt, tmp_path):
    from steerscope.cli.sweep import run_point
    from steerscope.jobs.grid_sweep import run_sweep

    base = {
        "model": str(ckpt / "ckpt"),
        "method": "melbo",
        "steps": 1500,
        "plateau": 0,
        "source": 0,
        "target": 2,
        "n-vectors": 2,
        "R": 1.0,
        "chat": False,
    }
    grid = {
        "command": "discover",
        "base": base,
        "grid": {"seed": [0, 1], "prompts": [str(ckpt / "p.txt"), str(ckpt / "missing.txt")]},
        "resources": {"num_cpus": 1},
        "max_retries": 2,
    }
    spec = load_grid(_write(tmp_path / "grid.json", grid))
    points = expand(spec)
    out = tmp_path / "sweep"
    ray, cluster = _cluster()
    try:
        assert len(cluster.list_all_nodes()) == 3  # a head and two workers
        victim = next(p for p in points if p.values["seed"] == 0 and p.values["prompts"].endswith("p.txt"))
        marker = out / "points" / victim.key / "sweep_running.json"
        killed = {}

        def assassin():
            t0 = time.monotonic()
            while time.monotonic() - t0 < 120:
                if marker.is_file():
                    time.sleep(0.5)
                    pid = json.loads(marker.read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
                    return
                time.sleep(0.05)

        t = threading.Thread(target=assassin)
        t.start()
        state = run_sweep(spec, points, out, run_point, address=cluster.address, progress=False)
        t.join()
        assert killed, "the point never started"
        st = state.points
        good = [k for k, v in st.items() if v["values"]["prompts"].endswith("p.txt")]
        bad = [k for k in st if k not in good]
        assert all(st[k]["status"] == "done" for k in good), {k: st[k] for k in good}
        assert st[victim.key]["attempts"] == 2  # killed once, retried by Ray, finished
        assert all(st[k]["status"] == "failed" and "does not exist" in st[k]["error"] for k in bad)
        for k in good:
            assert (out / "points" / k / "out" / "vectors.safetensors").is_file()
            assert st[k]["headline"]["vectors"] == 2
        saved = json.loads((out / "sweep.json").read_text())
        assert saved["counts"] == {"pending": 0, "running": 0, "done": 2, "failed": 2}
        html = (out / "sweep.html").read_text()
        assert html.count('data-status="done"') == 2 and html.count('data-status="failed"') == 2

        nodes = {
            line.split()[-1]
            for k in st
            for line in (out / "points" / k / "sweep_attempts.log").read_text().splitlines()
        }
        assert len(nodes) == 2, nodes  # both worker nodes ran points (the head has no CPUs)

        # a rerun skips the finished points and tries the failed ones again
        before = {k: (out / "points" / k / "sweep_attempts.log").read_text() for k in good}
        again = run_sweep(spec, points, out, run_point, address=cluster.address, progress=False)
        assert {k: (out / "points" / k / "sweep_attempts.log").read_text() for k in good} == before
        assert all(again.points[k]["status"] == "failed" for k in bad)
        assert all(len((out / "points" / k / "sweep_attempts.log").read_text().splitlines()) == 2 for k in bad)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
