"""Post-hoc analysis of bench_audit's folders (NOT a frozen default; written after the held-out
audits had been seen): would ranking the sampling methods' significant findings by how natural
they are to the fine-tune put the planted behaviour in the top 3 more often?

The held-out audits showed amplification's significant findings led by fragments ("What", "I'm
glad": amplified samples that stopped after a token or two) and broken text. Both are unlikely
under the fine-tune itself, and a planted behaviour is not: the signature `run` already ranks by
(judging.findings). Here each significant finding of `sample` and `amplify` gets the fine-tune's
mean log-probability per token of its completions (the end-of-text token counted when a sample
stopped early), minus that of the fine-tune's own samples; findings are re-ranked by it (then by
prompts) and the planted behaviour's rank is read as bench_audit reads it. No sample is redrawn.

    python benchmarks/audit_rerank.py            # every organism folder under runs/audit-bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steerscope.judging.metrics import parse_metric  # noqa: E402
from steerscope.judging.vector_metrics import completion_logprobs  # noqa: E402
from steerscope.models.loading import load_model  # noqa: E402
from steerscope.models.organisms import ORGANISMS  # noqa: E402


def _lines(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/audit-bench")
    out = []
    for name, org in ORGANISMS.items():
        folder = root / name
        if not (folder / "blackbox.json").is_file():
            continue
        lm = load_model(f"organism:{name}")
        cfg = json.loads((folder / "config.json").read_text())["config"]
        samples = _lines(folder / "samples.jsonl")
        bb = json.loads((folder / "blackbox.json").read_text())
        eos = lm.tokenizer.eos_token_id
        ids = [r["token_ids"] + ([eos] if len(r["token_ids"]) < cfg["max_new_tokens"] else []) for r in samples]
        lps = completion_logprobs(lm, [r["prompt"] for r in samples], ids)
        own = [lp for lp, r in zip(lps, samples) if r["model"] == "finetune"]
        ref = sum(own) / len(own)
        detect = parse_metric(org.detector, None).fn
        row = {"organism": name, "split": org.split}
        for m in ("sample", "amplify"):
            found = [f for f in bb["methods"][m]["findings"] if f["significant"]]
            for f in found:
                f["natural"] = sum(lps[i] for i in f["rows"]) / len(f["rows"]) - ref
                texts = [samples[i]["text"] for i in f["rows"]]
                f["planted"] = sum(bool(x) for x in detect(texts)) > len(texts) / 2
            before = next((k + 1 for k, f in enumerate(found) if f["planted"]), None)
            found.sort(key=lambda f: (-f["natural"], -f["prompts"]))
            after = next((k + 1 for k, f in enumerate(found) if f["planted"]), None)
            row[m] = {"before": before, "after": after, "significant": len(found)}
        out.append(row)
        print(json.dumps(row), flush=True)
    Path("benchmarks/results/audit_rerank.json").write_text(json.dumps({"results": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
