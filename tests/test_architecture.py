"""The package's shape: one-way imports without cycles, one registration shape, configs documented
field by field, and a CLI whose flags and defaults are the library's."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import networkx as nx  # a dependency of torch, so always installed
import pytest

import steerscope
import steerscope.sae  # noqa: F401  (registers ClampFeature and the SAE architectures)
from steerscope.cli import CMD_MODULES, COMMANDS, build_parser, main
from steerscope.cli._args import _UNSET, config_from_args, walk_flags
from steerscope.config import Family, field_docs

ROOT = Path(steerscope.__file__).parent
assert len(COMMANDS) >= 14  # importing steerscope.cli registers every command

# models -> interventions -> directions -> generation -> adapters -> sae -> judging -> report -> jobs -> cli
RANK = {
    "_version": 0,
    "config": 0,
    "errors": 0,
    "checkpoint": 0,
    "progress": 0,
    "_io": 0,
    "_tensors": 0,
    "models": 1,
    "interventions": 2,
    "directions": 3,
    "amplify": 3.5,
    "generation": 4,
    "adapters": 4.5,
    "sae": 5,
    "judging": 6,
    "report": 7,
    "jobs": 8,
    "serving": 8,
    "cli": 9,
    "__init__": 10,
    "__main__": 10,
}


def _unit(module: str) -> str:
    """`steerscope.directions.vectors` -> `directions`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module(path: Path, root: Path = ROOT) -> str:
    """`ROOT/directions/vectors.py` -> `steerscope.directions.vectors`; a package is its folder's name."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every steerscope module imported anywhere in the file (function bodies included). A name
    imported from a package is that submodule when one exists (`from . import sweep`), else the
    package itself (`from . import main`)."""
    rel = path.relative_to(root.parent).with_suffix("")
    pkg = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            sub = [f"{mod}.{a.name}" for a in node.names]
            names = [s if _exists(s, root) else mod for s in sub]
            out += [n for n in names if n.split(".")[0] == root.name]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == root.name]
    return out


def _exists(module: str, root: Path) -> bool:
    p = root.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def _layer_violations(path: Path, root: Path = ROOT) -> list[str]:
    me = _unit(_module(path, root))
    if me not in RANK:
        return [f"{path} is in no layer; add it to RANK and the package docstring"]
    out = []
    for mod in _imports(path, root):
        other = _unit(mod)
        if RANK.get(other, 99) > RANK[me]:
            out.append(f"{path.relative_to(root)} ({me}) imports {mod} ({other}), a higher layer")
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    assert not _layer_violations(path), _layer_violations(path)


def _package(tmp: Path, files: dict[str, str]) -> Path:
    """A throwaway package `steerscope` under `tmp` holding `files` (path -> source)."""
    root = tmp / "steerscope"
    for rel, src in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(src)
    for d in [p for p in root.rglob("*") if p.is_dir()]:
        (d / "__init__.py").touch()
    return root


def test_the_layer_checker_sees_a_violation(tmp_path):
    """The layer checker itself can fail: `models` importing `judging` inside a function, in a
    package in a temporary folder (never written into the installed one)."""
    root = _package(
        tmp_path, {"models/fake.py": "def f():\n    from ..judging import metrics\n", "judging/metrics.py": ""}
    )
    found = _layer_violations(root / "models" / "fake.py", root)
    assert found and "imports steerscope.judging.metrics (judging), a higher layer" in found[0]
    assert not _layer_violations(root / "judging" / "metrics.py", root)


def _import_graph(root: Path = ROOT) -> nx.DiGraph:
    """Module -> every steerscope module it imports, at module level or inside a function: a lazy
    import hides a cycle from the interpreter, not from the reader, who must still understand both
    modules together. Not edges: a package's `__init__` run because a submodule of it is imported
    (Python finishes the parent first; counting it would make every package with re-exports a cycle)."""
    g = nx.DiGraph()
    for path in sorted(root.rglob("*.py")):
        me = _module(path, root)
        g.add_node(me)
        g.add_edges_from((me, m) for m in _imports(path, root) if m != me)
    return g


def _cycles(root: Path = ROOT) -> list[list[str]]:
    """Every elementary import cycle, each starting at its first module by name."""
    turned = [c[c.index(min(c)) :] + c[: c.index(min(c))] for c in nx.simple_cycles(_import_graph(root))]
    return sorted(turned, key=lambda c: (len(c), c))


def test_no_import_cycles():
    """No two steerscope modules import each other, directly or through others (at the time of
    this check's introduction the CLI had 8: cli <-> each cli_*.py)."""
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_the_cycle_checker_sees_a_cycle(tmp_path):
    """The old CLI's shape: the package imports its command modules and one of them imports the
    package back inside a function. A cycle; importing a sibling module instead is none."""
    cycle = {
        "cli/__init__.py": "from . import sweep\nfrom ._registry import dispatch\n",
        "cli/_registry.py": "def dispatch(argv):\n    return 0\n",
        "cli/sweep.py": "def run_point():\n    from . import dispatch\n",
    }
    assert _cycles(_package(tmp_path / "a", cycle)) == [["steerscope.cli", "steerscope.cli.sweep"]]
    fixed = {**cycle, "cli/sweep.py": "def run_point():\n    from ._registry import dispatch\n"}
    assert _cycles(_package(tmp_path / "b", fixed)) == []


def test_every_cli_module_is_listed():
    """A command module left out of CMD_MODULES would register nothing (`steerscope.cli`)."""
    listed = {m.__name__.rsplit(".", 1)[1] for m in CMD_MODULES}
    on_disk = {p.stem for p in (ROOT / "cli").glob("*.py") if not p.stem.startswith("_")}
    assert listed == on_disk
    assert {c.handler.__module__.rsplit(".", 1)[1] for c in COMMANDS.values()} == listed


def test_vector_files_do_not_import_interventions():
    mods = _imports(ROOT / "directions" / "vectors.py")
    assert not [m for m in mods if ".interventions" in m]


def _families() -> dict[str, Family]:
    from steerscope.config import Family as F

    found = {}
    for path in MODULES:
        mod = "steerscope." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if mod.endswith("__main__"):
            continue
        m = __import__(mod, fromlist=["x"])
        for v in vars(m).values():
            if isinstance(v, F):
                found[v.name] = v
    return found


def test_every_family_found_and_nonempty():
    fams = _families()
    assert set(fams) == {
        "discovery",
        "extractors",
        "metrics",
        "sae_archs",
        "sae_baselines",
        "interventions",
        "bench_methods",
        "refine_methods",
    }
    assert all(len(f) >= 3 for f in fams.values())
    assert "sae_clamp" in fams["interventions"]


@pytest.mark.parametrize(
    "family",
    [
        "discovery",
        "extractors",
        "metrics",
        "sae_archs",
        "sae_baselines",
        "interventions",
        "bench_methods",
        "refine_methods",
    ],
)
def test_methods_are_documented_with_frozen_documented_configs(family):
    fam = _families()[family]
    for name, m in fam.items():
        assert m.doc, f"{family}/{name} has no docstring"
        if m.config is not None:
            assert m.config.__dataclass_params__.frozen
            docs = field_docs(m.config)
            missing = [f.name for f in dataclasses.fields(m.config) if not docs.get(f.name)]
            assert not missing, f"{family}/{name}: fields without a docstring: {missing}"


def test_no_string_dispatch_on_method_names_outside_registries():
    pattern = re.compile(
        r"""(method|arch|kind)\s*==\s*["'](melbo|jacobian|pca|random|dct|topk|batchtopk|relu|diffmean|probe)["']"""
    )
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in MODULES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


# ---- the CLI --------------------------------------------------------------------------------------
def _required(cmd) -> list[str]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    words = cmd.name.split()
    p = sub[words[0]]
    if len(words) == 2:
        p = p._subparsers._group_actions[0].choices[words[1]]
    return p, [a for a in p._actions if a.required]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_defaults_equal_library_defaults(name):
    """Parse each command with only its required flags: the config must equal the library default,
    every field of it must have a flag, and --help must show the library's default."""
    cmd = COMMANDS[name]
    parser, required = _required(cmd)
    argv = []
    for a in required:
        argv += [a.option_strings[0], "3" if a.type is not None and a.type.__name__ == "int" else "x"]
    ns = parser.parse_args(argv)
    default = cmd.default()
    got = config_from_args(default, ns)
    given = {a.dest for a in required}
    for dest, lib in walk_flags(default):
        if dest in given or ".method_config." in dest:
            continue  # method settings: test_cli_method_settings_default_to_each_methods_library_defaults
        obj = got
        for part in dest.split("."):
            obj = getattr(obj, part)
        assert obj == lib, f"{name}: {dest} is {obj!r} from the CLI but {lib!r} in the library"
        assert getattr(ns, dest, _UNSET) is _UNSET
    flags = {o for a in parser._actions for o in a.option_strings}
    assert len({dest for dest, _ in walk_flags(default)}) <= len(flags)  # methods sharing a setting share its flag


def test_run_exposes_every_discovery_setting():
    """Every field of RunConfig (nested discovery and method settings included) is a flag of `run`."""
    from steerscope.jobs.run import RunConfig

    parser, _ = _required(COMMANDS["run"])
    dests = {a.dest for a in parser._actions}
    for dest, _ in walk_flags(RunConfig(), "run."):
        assert dest in dests, f"run has no flag for {dest}"
    for flag in (
        "--target-tokens",
        "--p",
        "--q",
        "--lr",
        "--sweep-multiples",
        "--cluster-threshold",
        "--device",
        "--dtype",
        "--R",
        "--steps",
        "--power-iters",
        "--n-vectors",
    ):
        assert any(flag in a.option_strings for a in parser._actions), flag


def test_run_flags_reach_the_config():
    from steerscope.cli._args import config_from_args as cfa

    parser, _ = _required(COMMANDS["run"])
    ns = parser.parse_args(
        [
            "--method",
            "melbo",
            "--R",
            "calibrate",
            "--steps",
            "7",
            "--target-tokens",
            "last:2",
            "--lr",
            "0.5",
            "--sweep-multiples",
            "1,3",
            "--cluster-threshold",
            "0.2",
            "--no-chat",
        ]
    )
    cfg = cfa(COMMANDS["run"].default(), ns).run
    d = cfg.discover
    assert d.R is None and d.method_config.steps == 7 and d.method_config.lr == 0.5 and d.target_tokens == "last:2"
    assert cfg.sweep_multiples == [1.0, 3.0] and cfg.cluster_threshold == 0.2 and d.chat is False
    ns = parser.parse_args(["--method", "jacobian", "--power-iters", "3"])
    cfg = cfa(COMMANDS["run"].default(), ns).run
    assert cfg.discover.method == "jacobian" and cfg.discover.method_config.power_iters == 3
    ns = parser.parse_args(
        ["--reply-tokens", "4", "--steps", "9", "--r-max-random", "0.3", "--n-samples", "0"]
    )  # the default method
    cfg = cfa(COMMANDS["run"].default(), ns).run
    assert cfg.discover.method == "kl" and cfg.discover.method_config.reply_tokens == 4
    assert (
        cfg.discover.method_config.steps == 9
        and cfg.r_max_random == 0.3
        and cfg.n_samples == 0
        and cfg.discover.R is None
    )
    ns = parser.parse_args(["--method", "dct", "--dct-tol", "0.1", "--sigma", "quadratic"])
    cfg = cfa(COMMANDS["run"].default(), ns).run
    assert cfg.discover.method == "dct" and cfg.discover.method_config.sigma == "quadratic"
    assert cfg.discover.method_config.dct_tol == 0.1


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_for_every_command(name, capsys):
    assert main(name.split() + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "(default:" in out or "(required)" in out


def _family_fields(cfg, prefix=""):
    """(dest prefix, field, parent config) of every family-chosen field inside `cfg`."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if "family" in f.metadata:
            out.append((prefix + f.name, f, cfg))
        elif dataclasses.is_dataclass(v):
            out += _family_fields(v, f"{prefix}{f.name}.")
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_method_settings_default_to_each_methods_library_defaults(name):
    """For every command with a method family (discover, run, extract): choosing each method with
    no further flag gives exactly that method's library config."""
    cmd = COMMANDS[name]
    default = cmd.default()
    fams = _family_fields(default)
    if not fams:
        pytest.skip("no method family")
    parser, required = _required(cmd)
    req = []
    for a in required:
        req += [a.option_strings[0], "3" if a.type is not None and a.type.__name__ == "int" else "x"]
    for dest, f, parent in fams:
        fam, by = f.metadata["family"], f.metadata["by"]
        flag = next(
            a.option_strings[0] for a in parser._actions if a.dest == dest.rsplit(".", 1)[0] + "." + by or a.dest == by
        )
        for method, m in fam.items():
            got = config_from_args(default, parser.parse_args(req + [flag, method]))
            obj = got
            for part in dest.split("."):
                obj = getattr(obj, part)
            expected = getattr(parent, f.name) if getattr(parent, by) == method else m.default_config()
            assert obj == expected, f"{name} --{by} {method}: {obj!r} != {expected!r}"
