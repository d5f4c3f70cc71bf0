"""Per-feature top-activating contexts, and a self-contained HTML page of them.

For each feature: the `n_top` tokens (across all texts) where it activates most, each shown with
`window` tokens of context on either side, the token itself highlighted with its activation.
The page also draws the feature-density histogram (log10 firing frequency per latent).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

import torch

from ..models.activations import read_layer


@dataclass
class Context:
    activation: float
    left: str
    token: str
    right: str


@torch.no_grad()
def top_contexts(
    lm,
    sae,
    texts: list[str],
    features: list[int] | None = None,
    *,
    n_top: int = 8,
    window: int = 8,
    context: int = 128,
    batch: int = 8,
    n_auto: int = 24,
) -> tuple[dict[int, list[Context]], torch.Tensor]:
    """({feature: contexts, highest first}, firing frequency per latent). `features=None` picks
    the `n_auto` most frequently firing latents."""
    layer, tok = sae.cfg.layer, lm.tokenizer
    best: dict[int, list[tuple[float, int, int]]] = {}
    fires = torch.zeros(sae.cfg.n_latents)
    sae.to(lm.device)  # the SAE runs where the activations are
    n_tokens = 0
    all_ids: list[list[int]] = []
    per_batch = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=context)
        ids, mask = enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)
        keep = mask.bool() & (mask.cumsum(-1) > 1)
        h = read_layer(lm, layer, ids, mask, sae.cfg.site)  # (B, T, d) on its block's device
        acts, _ = sae.encode(h[keep.to(h.device)].float().to(lm.device))  # (n_keep, n_latents)
        fires += (acts > 0).sum(0).float().cpu()
        n_tokens += len(acts)
        rows, cols = keep.nonzero(as_tuple=True)
        base = len(all_ids)
        all_ids.extend(ids[b][mask[b].bool()].tolist() for b in range(len(ids)))
        # position within the unpadded text (the tokenizer may pad on either side)
        offs = (mask.cumsum(-1) - 1)[rows, cols]
        per_batch.append((acts, (rows + base).tolist(), offs.tolist()))
    freq = fires / max(1, n_tokens)
    chosen = features if features is not None else freq.argsort(descending=True)[:n_auto].tolist()
    for f in chosen:
        cand = []
        for acts, text_idx, offs in per_batch:
            col = acts[:, f]
            k = min(n_top, len(col))
            v, j = col.topk(k)
            cand += [(float(a), text_idx[q], offs[q]) for a, q in zip(v.tolist(), j.tolist()) if a > 0]
        best[f] = sorted(cand, key=lambda c: -c[0])[:n_top]
    out = {}
    for f, items in best.items():
        ctxs = []
        for a, t, p in items:
            ids = all_ids[t]
            ctxs.append(
                Context(
                    a,
                    tok.decode(ids[max(0, p - window) : p]),
                    tok.decode(ids[p : p + 1]),
                    tok.decode(ids[p + 1 : p + 1 + window]),
                )
            )
        out[f] = ctxs
    return out, freq


def render_features_page(contexts: dict[int, list[Context]], freq: torch.Tensor, title: str) -> str:
    hist = torch.histc(torch.log10(freq[freq > 0]), bins=12, min=-6, max=0).tolist() if (freq > 0).any() else [0] * 12
    dead = int((freq == 0).sum())
    W, H = 480, 160
    mx = max(hist + [1])
    bars = "".join(
        f'<rect x="{20 + i * 36}" y="{H - 20 - h / mx * (H - 40):.1f}" width="30" height="{h / mx * (H - 40):.1f}" '
        f'fill="#4e79a7"><title>{int(h)} latents</title></rect>'
        f'<text x="{35 + i * 36}" y="{H - 6}" font-size="9" text-anchor="middle">{-6 + i * 0.5:g}</text>'
        for i, h in enumerate(hist)
    )
    cards = []
    for f, ctxs in contexts.items():
        rows = (
            "".join(
                f'<tr><td>{c.activation:.3g}</td><td class="ctx">{escape(c.left)}<mark>{escape(c.token)}</mark>'
                f"{escape(c.right)}</td></tr>"
                for c in ctxs
            )
            or "<tr><td colspan=2>never fires on this text</td></tr>"
        )
        cards.append(
            f'<div class="feature" data-feature="{f}"><h3>feature {f} <small>fires on {float(freq[f]):.2%} of tokens'
            f"</small></h3><table>{rows}</table></div>"
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;max-width:1100px}}table{{border-collapse:collapse;font-size:13px;width:100%}}
td{{border-bottom:1px solid #eee;padding:3px 6px;vertical-align:top}}td.ctx{{white-space:pre-wrap;font-family:monospace}}
mark{{background:#ffd54f}}.feature{{border:1px solid #ddd;border-radius:6px;padding:6px 12px;margin:10px 0}}
</style></head><body><h1>{escape(title)}</h1>
<h2>Feature density</h2><svg id="density" width="{W}" height="{H}">{bars}</svg>
<p>log10 firing frequency per latent; {dead} latents never fired ({dead / len(freq):.1%}).</p>
<h2>Top-activating contexts</h2>{"".join(cards)}</body></html>"""
