"""Evaluating an SAE (or a baseline dictionary) on held-out text.

    l0             mean number of active latents per token
    fvu            ||x - x_hat||^2 / ||x - mean(x)||^2 (fraction of variance unexplained)
    ce_recovered   (CE_zero - CE_spliced) / (CE_zero - CE_clean): the reconstruction spliced into
                   the forward pass at the SAE's site, against zero-ablating the site
    kl_spliced     mean KL(clean || spliced) of the next-token distributions
    dead_frac      share of latents that never fire on the evaluation tokens
    density        histogram of log10(firing frequency) per latent (bin edges -6..0)
Splicing and statistics cover every real token except each text's first, as in training (the
first token's activation is an outlier the SAE never saw).

Baselines (`baseline_dictionary`): PCA, FastICA and random orthonormal directions, made into
dictionaries with the same sparsity by keeping each token's k largest-magnitude coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..config import Family
from ..models.activations import record
from ..models.hooks import hooks
from ..models.registry import Site

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (codes, recon)


@dataclass
class SAEEval:
    n_tokens: int
    l0: float
    fvu: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    kl_spliced: float
    dead_frac: float
    density: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def sae_codec(sae) -> Encoder:
    def f(x):
        sae.to(x.device)  # the SAE runs where the activations are
        out = sae(x)
        return out.acts, out.recon

    return f


SAE_BASELINES: Family = Family("sae_baselines", "baseline dictionary")


@SAE_BASELINES.register("pca")
def _pca_dictionary(xc: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of the centred activations (orthonormal: codes are projections)."""
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    return vh.T, vh


@SAE_BASELINES.register("random")
def _random_dictionary(xc: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random orthonormal basis."""
    d = xc.shape[1]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q, q.T


@SAE_BASELINES.register("ica")
def _ica_dictionary(xc: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FastICA components (scikit-learn)."""
    from sklearn.decomposition import FastICA

    ica = FastICA(n_components=xc.shape[1], random_state=seed, max_iter=400, whiten="unit-variance").fit(xc.numpy())
    return torch.from_numpy(ica.components_.T.copy()), torch.from_numpy(ica.mixing_.T.copy())  # (d, n), (n, d)


def baseline_dictionary(kind: str, x: torch.Tensor, k: int, seed: int = 0) -> Encoder:
    """An equally sparse dictionary from `x` (N, d), one of `SAE_BASELINES` (pca | ica | random):
    each token keeps its k largest-magnitude coefficients."""
    x = x.double().cpu()
    mu = x.mean(0)
    enc, dec = SAE_BASELINES.get(kind).fn(x - mu, seed)

    def f(xb):
        c = (xb.double() - mu.to(xb.device)) @ enc.to(xb.device)
        top = c.abs().topk(min(k, c.shape[1]), dim=-1).indices
        sparse = torch.zeros_like(c).scatter(-1, top, c.gather(-1, top))
        return sparse.float(), (sparse @ dec.to(xb.device) + mu.to(xb.device)).float()

    return f


@torch.no_grad()
def evaluate(
    lm,
    codec: Encoder,
    texts: list[str],
    layer: int,
    *,
    site: str = "resid_post",
    n_latents: int | None = None,
    context: int = 128,
    batch: int = 8,
) -> SAEEval:
    layer = lm.check_layer(layer)
    module, kind = lm.arch.resolve(Site(layer, site))  # type: ignore[arg-type]
    tot = {"n": 0, "l0": 0.0, "err": 0.0, "ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl": 0.0, "ntok": 0}
    xs, fires = [], None
    for i in range(0, len(texts), batch):
        enc = lm.tokenizer(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=context)
        ids, mask = enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)
        keep = mask.bool() & (mask.cumsum(-1) > 1)  # real tokens except the first of each text
        with record(lm, [layer], kind=site) as r:
            clean = lm.forward(ids, mask).logits.float()
        x = r[layer][keep.to(r[layer].device)].float().to(lm.device)  # the block may sit on another device
        codes, recon = codec(x)
        xs.append(x)
        fired = (codes != 0).sum(0)
        fires = fired if fires is None else fires + fired
        tot["l0"] += float((codes != 0).sum())
        tot["err"] += float((x - recon).square().sum())
        tot["n"] += len(x)

        def splice(values, keep=keep):
            def fn(h):
                out = h.clone()
                out[keep.to(h.device)] = values.to(h.device, h.dtype)
                return out

            return fn

        with hooks([(module, kind, splice(recon))]):
            spliced = lm.forward(ids, mask).logits.float()
        with hooks([(module, kind, splice(torch.zeros_like(x)))]):
            zero = lm.forward(ids, mask).logits.float()
        # predictions made at spliced positions, of the next real token
        tgt, pmask = ids[:, 1:], keep[:, :-1] & mask[:, 1:].bool()
        for name, lg in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zero)):
            ce = torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), tgt, reduction="none")
            tot[name] += float(ce[pmask].sum())
        lp, lq = torch.log_softmax(clean, -1), torch.log_softmax(spliced, -1)
        tot["kl"] += float((lp.exp() * (lp - lq)).sum(-1)[keep].sum())
        tot["ntok"] += int(pmask.sum())
    allx = torch.cat(xs)
    fvu = tot["err"] / float((allx - allx.mean(0)).square().sum())
    ce = {k: tot[k] / max(1, tot["ntok"]) for k in ("ce_clean", "ce_sae", "ce_zero")}
    denom = ce["ce_zero"] - ce["ce_clean"]
    freq = fires.float() / tot["n"]
    n_lat = n_latents or len(freq)
    density = (
        torch.histc(torch.log10(freq[freq > 0]), bins=12, min=-6, max=0).long().tolist()
        if (freq > 0).any()
        else [0] * 12
    )
    return SAEEval(
        tot["n"],
        tot["l0"] / tot["n"],
        fvu,
        ce["ce_clean"],
        ce["ce_sae"],
        ce["ce_zero"],
        (ce["ce_zero"] - ce["ce_sae"]) / denom if denom else float("nan"),
        tot["kl"] / tot["n"],
        float((freq == 0).sum()) / n_lat,
        density,
    )
