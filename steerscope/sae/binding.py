"""The binding SAE: a TopK SAE whose decoder is restricted to `slots` copies of one base dictionary,
each moved by one shared learned linear map:

    W_dec = [D ; D M_1 ; ... ; D M_{slots-1}]        # (slots * n_base, d_in)
    D   (n_base, d_in)   the slot-1 features, unit rows during training
    M_k (d_in, d_in)     the map taking a slot-1 feature to slot k+1, shared by all features

so latent `s * n_base + i` is feature i "bound" to slot s+1. The encoder (W_enc, b_enc) and the
sparsity rule are TopK's (Gao et al. 2024). Saved in the SAELens layout as a plain TopK SAE with W_dec
materialised, plus D and M_1.. as extra tensors; cfg.json's steerscope section records arch and slots
so `load_saelens` rebuilds the structure (and checks that W_dec equals [D ; D M]).

Finding M. From its random start gradient descent does not find a planted M* (tests/test_sae_binding.py):
which slot-2 atom pairs with which slot-1 atom is a combinatorial choice the gradient cannot make.
Two `TrainConfig.binding_init` options make it from data instead, both starting from a plain TopK SAE
of the same size trained first:
- `icp` registers that SAE's atom set onto itself: the orthogonal map R under which the best-matched
  half of the atoms lands on the other half (ICP, Besl & McKay 1992, each step refitting R by
  orthogonal Procrustes, Schonemann 1966, from many random starts). The search is over SO(d) at
  random: at d = 16 a start lands in M*'s basin about once in 10-50 thousand, so it finds M* on
  1 of 3 seeds (benchmarks/binding_warm_start.py).
- `match` (`match_slot_map`, two slots) searches nothing at random. The TopK atoms are too noisy to
  read the structure off (cosine ~0.9 to the truth; inner products off by ~0.1, half their spread),
  so they are first sharpened by MOD with nonnegative OMP codes (~0.99). With clean codes the data
  then says which atoms share a slot: the synthetic draws a sample's features of one slot without
  replacement, so same-slot atoms co-fire about half as often as chance, cross-slot ones at chance
  (data with one feature per slot per sample would be exactly bipartite; data whose slots co-fire
  freely would give no split, and match would then fail: untested on real data); a balanced
  max-cut of that co-firing graph splits the slots (97-98 % of atoms right on the dev seeds; from
  the TopK codes directly only 53-64 %). An orthogonal M keeps inner products, so sorted inner
  products within a slot fingerprint each atom; Hungarian matching of fingerprints gets ~30-60 % of
  the pairs right, the largest mutually consistent set of them (a clique) is all right, and it grows
  greedily to all pairs; Procrustes + ICP give M. Finds M* on 6 of 6 seeds at d = 16 (M error
  0.20-0.33; seeds 0-2 developed on, 3-5 measured after freezing; binding_warm_start.json).
Both assume an orthogonal M (the synthetic's M* is one); a general linear M does not keep inner
products and would need another pairing (untried), as would d in the hundreds (untried).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SteerscopeError
from .archs import SAE_ARCHS, TopK
from .model import SAE


class BindingSAE(SAE):
    """An SAE with the tied slot structure above; `W_dec` is computed from D and M."""

    def _init_decoder(self, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        slots, d = self.cfg.slots, self.cfg.d_in
        n_base = self.cfg.n_latents // slots
        self.D = nn.Parameter(w[:n_base].clone())  # (n_base, d) unit rows
        # M_k starts as a random orthogonal matrix, not the identity: D M_k then has unit rows in
        # random directions, the same distribution as a plain SAE's initial decoder, so each slot
        # starts as an independent dictionary. With M = I every slot-2 latent would start as an
        # exact copy of its slot-1 latent (identical encoder columns and gradients: a symmetry
        # TopK has to break by ties), and M would have to travel far to reach a rotation.
        q = torch.linalg.qr(torch.randn(slots - 1, d, d, generator=g)).Q  # (slots-1, d, d)
        self.M = nn.Parameter(q)
        return self.W_dec.detach().clone()

    @property
    def W_dec(self) -> torch.Tensor:  # (slots * n_base, d)
        return torch.cat([self.D] + [self.D @ m for m in self.M])

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # Only D is constrained: D M_k's row norms are M's business (the encoder absorbs a scale).
        self.D.div_(self.D.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        if self.D.grad is not None:
            self.D.grad -= (self.D.grad * self.D).sum(-1, keepdim=True) * self.D

    @torch.no_grad()
    def divide_decoder_(self, scale: float) -> None:
        self.D.div_(scale)  # W_dec is linear in D, so this divides every slot


@torch.no_grad()
def icp_slot_map(W: torch.Tensor, n_base: int, restarts: int, iters: int = 10, seed: int = 0):
    """The orthogonal R (d, d) under which n_base of the atoms W (N, d) land best on other atoms,
    from `restarts` random starts; returns (R, source atom indices (n_base,), score = their mean cosine)."""
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d, eye = W.shape[1], torch.eye(len(W), dtype=torch.bool, device=W.device)
    chunk = max(1, min(2000, 2**24 // (d * d + len(W) ** 2)))  # starts per batch: ~0.2 GB of float32 at most
    g = torch.Generator().manual_seed(seed)
    best = (-2.0, None, None)
    for r in range(0, restarts, chunk):
        R = torch.linalg.qr(torch.randn(min(chunk, restarts - r), d, d, generator=g)).Q.to(W)  # (r, d, d)
        for it in range(iters + 1):
            S = torch.einsum("nd,rde,me->rnm", W, R, W).masked_fill(eye, -2.0)  # (r, N, N): cos(a R, b)
            match, tgt = S.max(-1)  # (r, N): each atom's best image match
            score, src = match.topk(n_base, -1)  # (r, n_base): the best-matched atoms are the sources
            if it == iters:
                break
            a, b = W[src], W[tgt.gather(1, src)]  # (r, n_base, d)
            u, _, vh = torch.linalg.svd(a.transpose(1, 2) @ b)
            R = u @ vh  # Procrustes: the orthogonal map minimising ||a R - b||
        i = int(score.mean(-1).argmax())
        if float(score[i].mean()) > best[0]:
            best = (float(score[i].mean()), R[i], src[i])
    return best[1], best[2], best[0]


@torch.no_grad()
def pursuit_codes(x: torch.Tensor, W: torch.Tensor, k: int) -> torch.Tensor:
    """Nonnegative greedy pursuit (OMP, Pati et al. 1993): k atoms of W (N, d) (unit rows) per row of
    x (n, d), coefficients refit by least squares after each pick; returns codes (n, N)."""
    sel = torch.zeros(len(x), 0, dtype=torch.long)
    r, coef = x, None
    for s in range(k):
        c = r @ W.T  # (n, N); positive picks only: the features add, they do not cancel
        if s:
            c.scatter_(1, sel, -float("inf"))
        sel = torch.cat([sel, c.argmax(-1, keepdim=True)], 1)  # (n, s+1)
        A = W[sel]  # (n, s+1, d)
        coef = torch.linalg.lstsq(A.transpose(1, 2), x[:, :, None]).solution[..., 0]  # (n, s+1)
        r = x - (coef[:, :, None] * A).sum(1)
    return torch.zeros(len(x), len(W)).scatter(1, sel, coef)


@torch.no_grad()
def refine_atoms(x: torch.Tensor, W: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """MOD (Engan et al. 1999): alternate pursuit codes and the least-squares dictionary; unit rows."""
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    for _ in range(iters):
        Z = pursuit_codes(x, W, k)  # (n, N)
        used = (Z != 0).any(0)  # an atom no row picked has no least-squares row: it keeps its last one
        new = torch.linalg.lstsq(Z[:, used], x, driver="gelsd").solution  # (n_used, d); SVD-based, rank-safe
        W = W.clone()
        W[used] = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return W


def _max_cut_halves(A: torch.Tensor, restarts: int, g: torch.Generator) -> torch.Tensor:
    """A balanced cut (two halves) of the graph with weights A (N, N) of large total crossing
    weight: best of `restarts` random halves improved by best-swap local search. Returns 0/1 (N,)."""
    n = len(A)
    # a gain below float32 rounding of the cut is no gain: swapping on it could cycle for ever
    tol = 1e-6 * float(A.abs().sum())
    best, best_cut = None, -float("inf")
    for _ in range(restarts):
        side = torch.zeros(n)
        side[torch.randperm(n, generator=g)[: n // 2]] = 1
        for _ in range(4 * n):  # each swap moves two atoms: 4n swaps is far past any local search seen
            sg = 2 * side - 1  # (N,) +-1
            gain = sg * (A @ sg)  # crossing weight won by moving one atom to the other side
            G = gain[:, None] + gain[None, :] - 2 * A * (sg[:, None] * sg[None, :])  # swap a (side 1), b (side 0)
            G = G.masked_fill(~((side[:, None] == 1) & (side[None, :] == 0)), -float("inf"))
            if float(G.max()) <= tol:
                break
            a, b = divmod(int(G.argmax()), n)
            side[a], side[b] = 0, 1
        sg = 2 * side - 1
        cut = float(((1 - sg[:, None] * sg[None, :]) * A).sum())
        if cut > best_cut:
            best, best_cut = side.clone(), cut
    return best


def _max_clique(adj: torch.Tensor, budget: int = 200_000) -> list[int]:
    """The largest clique of a small graph (Bron & Kerbosch 1973, with pivoting); exponential on dense
    graphs, so it refuses after `budget` steps instead of running for hours."""
    nbr = [set(torch.nonzero(adj[i]).flatten().tolist()) - {i} for i in range(len(adj))]
    best: list[int] = []
    steps = 0

    def grow(r, p, x):
        nonlocal best, steps
        steps += 1
        if steps > budget:
            raise SteerscopeError(
                "--binding-init match: the atoms' inner products agree too often to pick out the true pairs "
                f"({len(adj)} atoms per slot); use --binding-init icp or random."
            )
        if not p and not x:
            best = r if len(r) > len(best) else best
            return
        if len(r) + len(p) <= len(best):
            return
        u = max(p | x, key=lambda v: len(nbr[v] & p))
        for v in list(p - nbr[u]):
            grow(r + [v], p & nbr[v], x & nbr[v])
            p, x = p - {v}, x | {v}

    grow([], set(range(len(adj))), set())
    return best


@torch.no_grad()
def match_slot_map(x: torch.Tensor, W: torch.Tensor, k: int, *, refine_iters: int = 30, tol: float = 0.08, seed=0):
    """D (n, d) and an orthogonal M (d, d) with D M ~ the other half of the atoms W (2n, d), found
    from the data x (rows, d) without a random search over rotations (`--binding-init match`):
    1. sharpen the atoms: MOD with nonnegative OMP codes (`refine_atoms`);
    2. split them into the two slots, where the data separate them by co-firing (the synthetic draws a
       sample's features of one slot without replacement, so two atoms of one slot fire together less
       often than chance and atoms of different slots do not): the balanced max-cut of
       (co-firing / expected co-firing - mean);
    3. pair slot-1 atom i with its slot-2 image: an orthogonal M keeps inner products, so each atom's
       sorted inner products with the rest of its slot are a fingerprint; Hungarian matching of
       fingerprints (scipy), then the largest set of pairs whose inner products agree within `tol`
       (a clique: true pairs agree with each other, wrong ones rarely do), grown greedily by the
       pair that agrees best with the set, to all n pairs;
    4. M by orthogonal Procrustes on the pairs, refined by ICP (Besl & McKay 1992) from slot 1 to slot 2.
    Returns (D, M, score = mean cosine of D M to its nearest slot-2 atom)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise SteerscopeError(
            "--binding-init match needs scipy: pip install scipy (or use --binding-init icp)."
        ) from None
    g = torch.Generator().manual_seed(seed)
    W = refine_atoms(x, W, k, refine_iters)
    n, eye = len(W) // 2, torch.eye(len(W), dtype=torch.bool)
    on = (pursuit_codes(x, W, k) > 0).float()  # (rows, 2n)
    freq = on.sum(0).clamp_min(1)
    ratio = (on.T @ on) / (freq[:, None] * freq[None, :] / len(x))  # (2n, 2n): co-firing / chance
    ratio = (ratio - ratio[~eye].mean()).masked_fill(eye, 0)
    side = _max_cut_halves(ratio, restarts=30, g=g).bool()
    A, B = W[side], W[~side]  # (n, d) each
    GA, GB = A @ A.T, B @ B.T  # (n, n)
    self_ = torch.eye(n, dtype=torch.bool)
    fa, fb = (G.masked_fill(self_, -2.0).sort(-1).values[:, 1:] for G in (GA, GB))  # (n, n-1) fingerprints
    r, c = (torch.as_tensor(v) for v in linear_sum_assignment(torch.cdist(fa, fb).numpy()))
    q = _max_clique((GA[r][:, r] - GB[c][:, c]).abs() < tol)  # pairs (r[q], c[q]) that agree with each other
    src, dst = r[q].tolist(), c[q].tolist()
    while len(src) < n:
        fs = [i for i in range(n) if i not in src]
        fd = [j for j in range(n) if j not in dst]
        cost = (GA[fs][:, src][:, None, :] - GB[fd][:, dst][None, :, :]).abs().mean(-1)  # (|fs|, |fd|)
        i, j = divmod(int(cost.argmin()), len(fd))
        src.append(fs[i])
        dst.append(fd[j])
    u, _, vh = torch.linalg.svd(A[src].T @ B[dst])
    M = u @ vh  # Procrustes: argmin over orthogonal M of ||A[src] M - B[dst]||
    for _ in range(20):  # ICP, slot 1 onto slot 2
        tgt = (A @ M @ B.T).argmax(-1)
        u, _, vh = torch.linalg.svd(A.T @ B[tgt])
        M = u @ vh
    return A, M, float((A @ M @ B.T).max(-1).values.mean())


@SAE_ARCHS.register("binding")
class Binding(TopK):
    """TopK encoder, decoder W_dec = [D ; D M_1 ; ...] with D and the slot maps M_k learned."""

    saelens = "topk"  # SAELens reads the materialised W_dec as a TopK SAE
    uses_slots = True
    module = BindingSAE

    @staticmethod
    def check(cfg) -> None:
        TopK.check(cfg)
        if cfg.n_latents % cfg.slots:
            raise SteerscopeError(f"binding: n_latents ({cfg.n_latents}) must be a multiple of --slots ({cfg.slots}).")

    @staticmethod
    def warm_start(sae, batches, tcfg) -> None:
        if tcfg.binding_init == "random":
            return
        from .train import train_sae

        cfg = sae.cfg
        if tcfg.binding_init == "match" and cfg.slots != 2:
            raise SteerscopeError(
                f"--binding-init match splits the atoms into two slots; --slots is {cfg.slots}: use --slots 2 or icp."
            )
        plain = cfg.replace(arch="topk", slots=2)
        warm, _ = train_sae(batches, plain, tcfg.replace(steps=tcfg.binding_warm_steps, binding_init="random"))
        W = warm.W_dec.detach().cpu()
        n_base = cfg.n_latents // cfg.slots
        if tcfg.binding_init == "match":
            rows, need = [], tcfg.binding_match_rows
            while need > 0:  # the activations the atoms are refined and split on, raw (b_dec removed)
                try:
                    rows.append(next(batches).detach().float().cpu())
                except StopIteration:
                    raise SteerscopeError(
                        "--binding-init match: the activations ran out; give more text or lower --binding-match-rows."
                    ) from None
                need -= len(rows[-1])
            x = torch.cat(rows) - warm.b_dec.detach().cpu()  # (rows, d)
            D, R, _ = match_slot_map(x, W, cfg.k, seed=tcfg.seed)
        else:
            R, src, _ = icp_slot_map(W, n_base, tcfg.binding_restarts, seed=tcfg.seed)
            D = W[src]
        with torch.no_grad():
            sae.D.copy_(D / D.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            sae.M[0].copy_(R)  # M_2.. (slots > 2, icp only) keep their random start
            sae.W_enc.copy_(sae.W_dec.T * cfg.rule.init_scale)  # the encoder starts as the decoder's transpose

    @staticmethod
    def extra_tensors(sae):
        return {"D": sae.D} | {f"M_{k + 1}": m for k, m in enumerate(sae.M)}

    @staticmethod
    def load_extra(sae, tensors):
        sae.D.copy_(tensors["D"])
        for k in range(len(sae.M)):
            sae.M[k].copy_(tensors[f"M_{k + 1}"])
        if not torch.allclose(sae.W_dec, tensors["W_dec"], atol=1e-5, rtol=1e-4):
            raise ValueError("W_dec is not [D ; D M_1 ; ...] of the stored D and M")
