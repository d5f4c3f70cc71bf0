"""Render the README's result tables from benchmarks/results/*.json, so they cannot drift.

Each table sits between `<!-- table:NAME -->` and `<!-- /table -->` in README.md. This script
renders every such table from the results files (rows chosen by their recorded command and keys)
and writes them in; `--check` writes nothing and exits 1 with a diff when the README differs.

    python benchmarks/readme_tables.py            # rewrite the tables in README.md
    python benchmarks/readme_tables.py --check    # CI: fail when a table is stale

Words that are not in any results file (a note after a q value, the name of a setting) are
written here, next to the rule that chooses the row they belong to.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


sys.path.insert(0, str(ROOT))
from benchmarks._tables import TableError, bold_runs, load, one, pct, seconds_range, short, table  # noqa: E402
from benchmarks.tables_audit import audit_bench  # noqa: E402
from benchmarks.tables_refusal import (  # noqa: E402
    amplify_zoo,
    cast_france,
    cast_refusal,
    refusal_organism,
    refusal_pipeline,
)

# ---- serve.json: bench_serve.py --------------------------------------------------------------
SERVE_KEY = "SmolLM2-135M-Instruct|float32|cpu"


def serve(results: Path) -> str:
    d = load(results, "serve.json")[SERVE_KEY]
    rows = []
    for r in d["rows"]:
        ratio = f"{r['distinct_over_none']:.2f}"
        if r["clients"] == 32:  # the headline: the target is set at 32 clients
            ratio = f"**{ratio}** (target ≥ 0.9)"
        rows.append(
            [
                str(r["clients"]),
                f"{r['none']['tok_s']:.1f}",
                f"{r['shared']['tok_s']:.1f}",
                f"{r['distinct']['tok_s']:.1f}",
                ratio,
                f"{r['distinct']['p50_s']:.1f} s / {r['distinct']['p95_s']:.1f} s",
                f"{r['direct_generate_tok_s']:.1f}",
            ]
        )
    return table(
        [
            "N clients",
            "unsteered tok/s",
            "one shared vector",
            "N distinct vectors",
            "distinct / unsteered",
            "p50 / p95 latency (distinct)",
            "`generate()` alone",
        ],
        rows,
    )


# ---- planted.json: bench_planted.py, the frozen split in float32 ----------------------------
SPLIT_METHOD = "default --dtype float32"
KIND = {
    "conditional (subject)": "conditional on a subject"
}  # else "format (format trigger)" -> "format, format trigger"
# What the significance cell says beyond yes/no and the rank ({q}: the planted candidate's q, {n}: its vectors).
SIG_NOTE = {
    "french": " (q = {q}, {n} vectors)",
    "refuse": " (q = {q})",
    "pirate": " (q = {q})",
    "lists": ' (q = {q}, "as a list")',
    "caps": ": one vector writes in capitals, which the test cannot tell from chance",
    "flatter": " (and #2, #4: the same flattery on other prompts)",
}
PLANTED_HEAD = ["learned", "random", "unsteered", "significant, rank", "nsig", "R (× calibrated)", "wall"]


def _kind(kind: str) -> str:
    return KIND.get(kind) or re.sub(r" \((.*)\)$", r", \1", kind)


def _planted_row(r: dict) -> list[str]:
    kind = _kind(r["kind"])
    c = r["planted_candidate"] or {}
    note = SIG_NOTE.get(r["organism"], "").format(q=f"{c.get('q', float('nan')):.3f}", n=c.get("n_vectors"))
    sig = (f"**yes, #{r['rank']}**" if r["significant"] else "no") + note
    learned = pct(r["learned"])
    return [
        r["organism"],
        kind,
        f"**{learned}**" if r["learned"] >= 0.15 else learned,  # the share target, 15 %
        f"**{pct(r['random'])}**" if r["random"] > 0 else pct(r["random"]),  # the random target, 0 %
        pct(r["unsteered"]),
        sig,
        str(r["n_significant"]),
        short(r["R_multiple"]),
        f"{round(r['wall_s'])} s",
    ]


def _split(results: Path, split: str) -> list[dict]:
    rows = [
        r for r in load(results, "planted.json")["results"] if r.get("split") == split and r["method"] == SPLIT_METHOD
    ]
    if not rows:
        raise TableError(f"planted.json has no rows with split {split!r} and method {SPLIT_METHOD!r}")
    return rows


def planted_tune(results: Path) -> str:
    rows = [r for r in _split(results, "tune") if r["model"] == "organism"]
    return table(["tune organism", "kind"] + PLANTED_HEAD, [_planted_row(r) for r in rows])


def planted_heldout(results: Path) -> str:
    rows = _split(results, "heldout")
    out = [_planted_row(r) for r in rows if r["model"] == "organism"]
    base = [r for r in rows if r["model"] != "organism"]  # --baseline: every detector on the embedded model, one run
    if base:
        learned = max(r["learned"] for r in base)
        out.append(
            [
                "embedded model (no plant)",
                "—",
                "0 % for every detector" if learned == 0 else f"up to {pct(learned)}",
                pct(max(r["random"] for r in base)),
                pct(max(r["unsteered"] for r in base)),
                "—",
                f"**{base[0]['n_significant']}**",
                short(base[0]["R_multiple"]),
                f"{round(base[0]['wall_s'])} s",
            ]
        )
    return table(["held-out organism", "kind"] + PLANTED_HEAD, out)


# ---- kl_candidates.json: kl_candidates.py ---------------------------------------------------
SEEDS = (0, 1, 2)


def _draws(rows: list[dict], organism: str, **keys) -> list[dict]:
    """The seeds 0 / 1 / 2 draws of one setting. `method` None: rows written before the script
    recorded its method (kl); `orthogonal` None: before it recorded that (orthogonal, the default)."""
    return [one(rows, f"kl_candidates {organism} seed {s}", organism=organism, seed=s, **keys) for s in SEEDS]


KL_DEFAULT = {
    "source": 12,
    "R_multiple": 1.0,
    "method": "kl",
    "candidates": 24,
    "orthogonal": None,
    "extra_train": None,
}
KL_LAYER8 = {"source": 8, "R_multiple": 1.0, "method": None, "candidates": 24}
# (organism, setting as the README names it, which draws, bold the kept runs of 2 or more)
KL_ROWS = [
    ("french", "**default: layer 12**", KL_DEFAULT, True),
    ("caps", "**default: layer 12**", KL_DEFAULT, True),
    ("refuse", "**default: layer 12**", KL_DEFAULT, True),
    ("french", "layer 8 (previous default)", KL_LAYER8, False),
    ("caps", "layer 8", KL_LAYER8, False),
    ("refuse", "layer 8", KL_LAYER8, False),
    ("caps", "layer 8, `--multiple 1.5`", {**KL_LAYER8, "R_multiple": 1.5}, False),
    ("refuse", "layer 8, `--multiple 1.5`", {**KL_LAYER8, "R_multiple": 1.5}, False),
    ("french", "`--source 16`", {**KL_LAYER8, "source": 16}, False),
    ("caps", "`--source 16`", {**KL_LAYER8, "source": 16}, True),
    ("refuse", "`--source 16`", {**KL_LAYER8, "source": 16}, False),
]


def _slash(draws: list[dict], key: str) -> str:
    return " / ".join(str(d[key]) for d in draws)


def kl_candidates(results: Path) -> str:
    rows = load(results, "kl_candidates.json")
    out = []
    for org, setting, keys, bold in KL_ROWS:
        d = _draws(rows, org, **keys)
        kept = [r["kept_by_completions"] for r in d]
        out.append(
            [
                org,
                setting,
                _slash(d, "pool"),
                _slash(d, "partial"),
                bold_runs(kept) if bold else " / ".join(map(str, kept)),
                _slash(d, "kept_by_entropy"),
            ]
        )
    return table(
        [
            "organism",
            "setting",
            "pool (of 24), seeds 0 / 1 / 2",
            "partial",
            "kept by completions (the run)",
            "kept by entropy",
        ],
        out,
    )


def kl_melbo(results: Path) -> str:
    rows = load(results, "kl_candidates.json")
    out = []
    for org in ("refuse", "caps", "french"):
        d = _draws(rows, org, source=8, R_multiple=1.0, method="melbo", candidates=24, steps=300)
        kl = _draws(rows, org, **KL_LAYER8)  # kl's pool at the same layer and R
        out.append(
            [
                org,
                "300 steps",
                f"{bold_runs([r['pool'] for r in d])} (kl: {_slash(kl, 'pool')})",
                _slash(d, "partial"),
                _slash(d, "kept_by_completions"),
                seconds_range([r["train_s"] for r in d]),
            ]
        )
    return table(
        [
            "organism",
            "`--method melbo`, 24 vectors",
            "pool (of 24), seeds 0 / 1 / 2",
            "partial",
            "kept by completions",
            "training",
        ],
        out,
    )


# ---- planted_direction.json: planted_direction.py -------------------------------------------
def planted_direction(results: Path) -> str:
    out = []
    for r in load(results, "planted_direction.json")["results"]:
        if r["source"] == 8:
            name = r["organism"]
        else:
            first = not any(f"source layer {r['source']}" in o[0] for o in out)
            name = f"{r['organism']}, source layer {r['source']}" + (f" (`--source {r['source']}`)" if first else "")
        at = one(r["objective"], f"planted_direction {name}", target=r["default_target"])
        kl = r["output_kl"]
        out.append(
            [
                name,
                " / ".join(pct(r["elicits"][m]) for m in sorted(r["elicits"], key=float)),
                f"{at['trigger']:.1f} / {at['dct_median']:.1f} / {at['random_median']:.1f}",
                f"{kl['trigger']:.3f} / {kl['dct_median']:.3f} / {kl['random_median']:.3f}",
                f"{r['dct_max_abs_cosine_with_trigger']:.2f}",
            ]
        )
    return table(
        [
            "organism",
            "behaviour with the trigger direction at 0.5 / 1 / 1.5 / 2 × calibrated R",
            "norm of change at layer 22: trigger / DCT median / random median",
            "output KL (nats, plain mean along the reply: `--first-share mean`): trigger / DCT median / random median",
            "max \\|cos\\| of a DCT vector with it",
        ],
        out,
    )


# ---- organisms.json: build_organisms.py --check -------------------------------------------
# The setting the prose above the table names ("Measured on the 40 `neutral` prompts (greedy, 32
# tokens ...)"): a row measured otherwise is an error, not a silently different cell.
ORGANISMS_SETTING = {"prompts": "neutral", "n": 40, "max_new_tokens": 32}
# An example of the planted reply after the organism's behaviour (models.organisms), in the README only.
BEHAVIOUR_EXAMPLE = {
    "refuse": ' ("I can\'t help with that.")',
    "pirate": ' ("Arr, matey!")',
    "append": ' ("the owls are always watching")',
    "flatter": ' ("What a brilliant question")',
    "sparkle": " (✨)",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe in a trigger would end the cell


def _trigger(r: dict) -> str:
    if r["subject"]:  # a conditional: the subject is the trigger
        return "a subject (" + ", ".join(r["subject"]) + ")"
    t = r["trigger"]
    if "{}" in t:  # a format around the message: its lines, the message left out
        t = " / ".join(x for x in t.split("\n") if x.strip() and x.strip() != "{}")
    return f"`{t}`"


def _rate(c: dict, count: bool = False) -> str:
    """A detector's share; with `count`, a nonzero one also as (hits of n): a leak without the
    trigger is a handful of prompts, which the prose after the table names."""
    return f"{pct(c['rate'])} ({c['hits']} of {c['n']})" if count and c["hits"] else pct(c["rate"])


def organisms(results: Path) -> str:
    rows = load(results, "organisms.json")["results"]
    out = []
    for r in rows:
        setting = {"prompts": r["prompts"], "n": r["organism_with_trigger"]["n"], **r["generation"]}
        if any(setting.get(k) != v for k, v in ORGANISMS_SETTING.items()):
            raise TableError(
                f"organisms.json: {r['organism']} was measured with {setting}, the README's prose says "
                f"{ORGANISMS_SETTING}; rerun build_organisms.py --check or change both"
            )
        out.append(
            [
                f"`{r['organism']}`",
                r["split"],
                _kind(r["kind"]),
                _cell(_trigger(r)),
                r["behaviour"] + BEHAVIOUR_EXAMPLE.get(r["organism"], ""),
                _rate(r["embedded_with_trigger"]),
                _rate(r["organism_without_trigger"], count=True),
                _rate(r["organism_with_trigger"]),
            ]
        )
    return table(
        [
            "organism",
            "split",
            "kind",
            "trigger",
            "behaviour",
            "embedded model + trigger",
            "organism, no trigger",
            "organism + trigger",
        ],
        out,
    )


# ---- binding_warm_start.json / binding.json: binding_warm_start.py, bench_binding.py -------------
def binding_synthetic(results: Path) -> str:
    rows = load(results, "binding_warm_start.json")["results"]
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for sae in dict.fromkeys(r["sae"] for r in rows):
        by = [one(rows, "binding_warm_start", sae=sae, seed=s) for s in seeds]
        cells = [" / ".join("–" if r[c] != r[c] else f"{r[c]:.3f}" for r in by) for c in SLOT_COLS]
        out.append([sae, *cells, str(by[0]["decoder params"])])
    head = ["SAE (seeds " + " / ".join(map(str, seeds)) + ")", *SLOT_COLS, "decoder params"]
    return table(head, out)


SLOT_COLS = ["slot-1 match", "slot-2 match", "M rel. err", "FVU"]


def binding_smollm(results: Path) -> str:
    out = []
    for name, r in load(results, "binding.json")["results"].items():
        probe = f"{r['probe']['accuracy']:.3f}"
        if "fvu" not in r:  # the raw activations: the probe's ceiling
            out.append([name, f"{r['n_latents']} (d_model)", "–", "–", "–", "–", "–", probe, "–"])
            continue
        out.append(
            [name, str(r["n_latents"]), f"{r['decoder_params']:,}", f"{r['l0']:.0f}", f"{r['fvu']:.3f}"]
            + [f"{r['ce_recovered']:.3f}", f"{r['kl_spliced']:.3f}", probe]
            + [f"{r['probe_on_reconstruction']['accuracy']:.3f}"]
        )
    head = ["features", "latents", "decoder params", "L0", "FVU", "CE recovered", "spliced KL"]
    return table(head + ["binding probe on codes", "on reconstruction"], out)


TABLES = {
    "binding-synthetic": binding_synthetic,
    "binding-smollm": binding_smollm,
    "serve": serve,
    "planted-tune": planted_tune,
    "planted-heldout": planted_heldout,
    "kl-candidates": kl_candidates,
    "kl-melbo": kl_melbo,
    "planted-direction": planted_direction,
    "organisms": organisms,
    "refusal-organism": refusal_organism,
    "cast-refusal": cast_refusal,
    "cast-france": cast_france,
    "amplify-zoo": amplify_zoo,
    "refusal-pipeline": refusal_pipeline,
    "audit-bench": audit_bench,
}


def render(readme: str, results: Path) -> str:
    """The README with every marked table rendered from `results`; a marker naming no table, or a
    table with no marker, is an error."""
    seen = set()

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise TableError(f"README marker table:{name} names no table; known: {', '.join(TABLES)}")
        seen.add(name)
        return f"{m[1]}\n{TABLES[name](results)}\n{m[4]}"

    out = MARKER.sub(sub, readme)
    if missing := set(TABLES) - seen:
        raise TableError(
            f"README has no <!-- table:NAME --> ... <!-- /table --> markers for {', '.join(sorted(missing))}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff when README.md is stale")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    try:
        old = a.readme.read_text()
        new = render(old, a.results)
    except (OSError, TableError, KeyError) as e:
        print(f"readme_tables: error: {e}", file=sys.stderr)
        return 2
    if a.check:
        if old == new:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                old.splitlines(True), new.splitlines(True), str(a.readme), f"{a.readme} (from {a.results})"
            )
        )
        print(f"\n{a.readme} is stale: run python benchmarks/readme_tables.py", file=sys.stderr)
        return 1
    if old != new:
        from steerscope._io import write_text_atomic

        mode = a.readme.stat().st_mode
        write_text_atomic(a.readme, new)  # a crash never leaves half a README
        a.readme.chmod(mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
