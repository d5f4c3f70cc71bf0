"""An audit's behaviour as vectors: `steerscope findings --run AUDIT --behaviour N --out DIR
[--ablation]`.

Without --ablation: the vectors of a steered method that found behaviour N (as `findings --export`
writes a run's finding), usable by `generate`, `select`, `sweep`. With --ablation: the unit
directions of a weightdiff or actdiff finding (u and -u are one direction) as a set meant for
`steerscope generate --mode ablate` on the FINE-TUNE, i.e. the direction that should remove the
behaviour, with what removing it measurably does, stored in the set's hyper-parameters:

    kl_neutral   mean next-token KL(fine-tune || fine-tune with the direction ablated) on the run's
                 neutral prompts (the side effect)
    share        the share of the fine-tune's samples (the audit's sampling prompts x draws,
                 temperature 1) that lie in the behaviour (within the cluster threshold of its
                 completions' centroid), without and with the ablation
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SteerscopeError
from .findings import export_finding

STEERED_ORDER = ("finetune", "weightdiff", "actdiff")


def load_audit(audit_dir: str | Path) -> dict:
    path = Path(audit_dir) / "audit.json"
    if not path.is_file():
        raise SteerscopeError(
            f"{audit_dir} is not a finished audit folder (no audit.json); run `steerscope audit --out {audit_dir}`."
        )
    return json.loads(path.read_text())


def _pick(t: dict, number: int, ablation: bool) -> tuple[dict, dict]:
    bs = t["behaviours"]
    if not 1 <= number <= len(bs):
        raise SteerscopeError(
            f"--behaviour {number}: the audit has behaviours 1..{len(bs)}"
            if bs
            else "--behaviour: the audit found no behaviour."
        )
    b = bs[number - 1]
    order = ("weightdiff", "actdiff") if ablation else STEERED_ORDER
    hit = next((x for m in order for x in b["found"] if x["method"] == m), None)
    if hit is None:
        by = ", ".join(sorted({x["method"] for x in b["found"]}))
        want = "weightdiff or actdiff" if ablation else "a steered method (finetune, weightdiff, actdiff)"
        raise SteerscopeError(
            f"--behaviour {number} was found by {by}, not by {want}: there is no direction to export"
            + (
                "; drop --ablation to export its steering vectors."
                if ablation and any(x["method"] == "finetune" for x in b["found"])
                else "."
            )
        )
    return b, hit


def export_behaviour(audit_dir: str | Path, number: int, out: str | Path, *, ablation: bool = False,
                     overwrite: bool = False, lm=None):  # fmt: skip
    """Write behaviour `number` (1 = the report's first) to `out`; returns the VectorSet."""
    audit = Path(audit_dir)
    t = load_audit(audit)
    b, hit = _pick(t, number, ablation)
    run = audit / "methods" / hit["method"]
    if not ablation:
        return export_finding(run, hit["rank"], out, overwrite=overwrite)
    from ..directions.vectors import VectorSet

    src = VectorSet.load(run / "vectors" / "learned")
    f = json.loads((run / "metrics.json").read_text())["findings"][hit["rank"]]
    dirs, ids, layers = [], [], []
    for v in f["vectors"]:
        u = src[v].vector.double()
        u = u / u.norm()
        if all(abs(float(u @ d)) < 0.999 for d in dirs):  # -u is the same ablation
            dirs.append(u)
            ids.append(v)
            layers.append(src[v].layer)
    if lm is None:
        from .audit import AuditConfig

        lm = AuditConfig.from_dict(t["config"]).model.load()  # the fine-tune
    effect = measure_ablation(lm, torch.stack(dirs).float(), layers, t, b, audit)
    vs = VectorSet.create(
        lm,
        torch.stack(dirs).float(),
        layers,
        "ablation",
        ids=[f"ablate-{i}" for i in ids],
        hyperparams={
            "intervention": "ablate",
            "usage": "steerscope generate --mode ablate on the fine-tune",
            "behaviour": {
                "audit": str(audit.resolve()),
                "number": number,
                "typical": b["typical"],
                "method": hit["method"],
            },
            "effect": effect,
        },
    )
    vs.save(out, overwrite=overwrite)
    return vs


def measure_ablation(lm, dirs: torch.Tensor, layers: list[int], t: dict, b: dict, audit: Path) -> list[dict]:
    """Per direction: KL on neutral prompts and the behaviour's share of fine-tune samples, without
    and with the ablation (module docstring). `dirs` (n, d) unit rows."""
    from ..directions.data import load_prompts
    from ..directions.vectors import VectorSet
    from ..generation import generate, last_token_logits
    from ..judging.change import Texts
    from ..judging.metrics import kl_divergence

    cfg = t["config"]
    vs = VectorSet.create(lm, dirs, layers, "ablation", ids=[f"d{i}" for i in range(len(dirs))])
    neutral = load_prompts("neutral")[-8:]
    logits = last_token_logits(lm, neutral, vectors=vs, mode="ablate", include_unsteered=True)  # (1 + n, P, V)
    kl = [float(kl_divergence(logits[0], logits[1 + i]).mean()) for i in range(len(dirs))]
    prompts = load_prompts(cfg["sample_prompts"])[: cfg["n_sample_prompts"]]
    res = generate(lm, prompts * cfg["draws"], vectors=vs, mode="ablate", include_unsteered=True,
                   max_new_tokens=cfg["max_new_tokens"], temperature=1.0, seed=cfg["seed"])  # fmt: skip
    texts = {}
    for r in res:
        texts.setdefault(r.vector_id, []).append(r.text)
    members = _behaviour_texts(t, b, audit)
    c = Texts.of(members).features().double().mean(0)
    c = c / c.norm().clamp_min(1e-12)

    def share(xs: list[str]) -> float:
        f = Texts.of(xs).features().double()
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return float(((1 - f @ c) <= cfg["cluster_threshold"]).double().mean())

    plain = share(texts[None])
    return [
        {
            "direction": i,
            "layer": layers[i],
            "kl_neutral": round(kl[i], 5),
            "share": round(plain, 4),
            "share_ablated": round(share(texts[f"d{i}"]), 4),
            "samples": len(texts[None]),
        }  # fmt: skip
        for i in range(len(dirs))
    ]


def _behaviour_texts(t: dict, b: dict, audit: Path) -> list[str]:
    """The completions of the findings that make the behaviour (the centroid the share is measured at)."""
    out = []
    for x in b["found"]:
        m = t["methods"][x["method"]]
        f = next((f for f in m["findings"] if f["rank"] == x["rank"]), None)
        if f:
            out += f["texts"]
    return out or [b["typical"]]
