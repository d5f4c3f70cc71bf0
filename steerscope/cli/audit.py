"""`steerscope audit`: what did a fine-tune change? Every method on one table (`jobs.audit`)."""

import time
from dataclasses import dataclass, field

from ..config import Config
from ._registry import command


def audit_config() -> type:
    from ..jobs.audit import AuditConfig

    @dataclass(frozen=True)
    class AuditCommand(Config):
        audit: AuditConfig = field(default_factory=AuditConfig)
        """the audit"""
        out: str | None = None
        """audit folder (auto: runs/audit-TIMESTAMP); an existing audit with the same settings resumes"""
        force: bool = False
        """replace an existing audit with different settings"""

    return AuditCommand


@command(
    "audit",
    "what did a fine-tune change? discovery, model diffing and sampling against its base, on one table",
    "Compare a fine-tune with its base by the fine-tune's own discovery, weight and activation differences "
    "(steering the base), discovery on the base (contrast), and black-box and amplified sampling; each under "
    "a null model; merge the findings into one table and write report.html. Rerun with the same --out to resume.",
    audit_config,
)
def cmd_audit(cfg) -> int:
    from ..jobs.audit import audit

    out = cfg.out or f"runs/audit-{time.strftime('%Y%m%d-%H%M%S')}"
    report = audit(cfg.audit, out, force=cfg.force)
    import json
    from pathlib import Path

    t = json.loads((Path(out) / "audit.json").read_text())
    changed = [b for b in t["behaviours"] if b["id"] in t["changed"]]
    print(f"behaviours the fine-tune changed (significant under at least one method): {len(changed)}")
    for b in changed:
        found = ", ".join(f"{x['method']} #{x['rank'] + 1} (q = {x['q']:.2g})" for x in b["found"])
        print(
            f"{b['id'] + 1}: {b['surface'] + ', ' if b['surface'] else ''}found by {found}\n   e.g. {b['typical'][:150]!r}"
        )
    for m, info in t["methods"].items():
        c = t["compute"].get(m, {})
        what = f"{info['significant']} significant" if info["status"] == "ran" else f"skipped: {info['why']}"
        print(f"  {m:>10}: {what}; {c.get('seconds', 0):.0f} s, {c.get('forward_tokens', 0):,} forward tokens")
    print(f"report: {report.resolve()}")
    return 0
