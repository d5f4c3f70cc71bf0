"""Reading residual-stream activations through hooks (see `registry` for what a layer is)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..config import parse_last
from ..errors import SteerscopeError
from .hooks import StopForward, hooks
from .registry import Site, SiteKind


@contextmanager
def record(
    lm, layers: Sequence[int], kind: SiteKind = "resid_post", detach: bool = True
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the activation at `Site(layer, kind)` for each layer during the block.

    Yields a dict layer -> (batch, pos, d_model) tensor from the latest forward call.
    """
    store: dict[int, torch.Tensor] = {}
    layers = [lm.check_layer(l) for l in layers]

    def keep(layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            store[layer] = x.detach() if detach else x
            return x

        return fn

    with hooks(lambda: [(*lm.arch.resolve(Site(l, kind)), keep(l)) for l in layers]):
        yield store


def read_positions(read: str) -> int:
    """How many positions per text a read spec takes: `last` and `mean` 1, `last:K` K."""
    k = parse_last(read, extra=("last", "mean"), what="read (--read):")
    return 1 if k in ("last", "mean") else int(k)


@torch.no_grad()
def collect_activations(
    lm,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    read: str = "last",
    chat: bool | None = False,
    formatted: bool = False,
    batch_size: int = 16,
    kind: SiteKind = "resid_post",
    progress=None,
) -> torch.Tensor:
    """(N, P, L, d) float64 activations: P read positions per text, L layers, all layers from one
    forward pass per batch (the one activation collector in steerscope).

    read: `last` (each text's last real token), `mean` (over its real tokens after the first,
          padding excluded; see below)
    or `last:K` (each of its last K tokens, oldest first). `formatted=True`: the texts already
    went through `lm.format_prompt`."""
    if len(texts) == 0:
        raise SteerscopeError("the prompt list is empty; give at least one prompt.")
    P = read_positions(read)
    layers = [lm.check_layer(l) for l in layers]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = lm.encode(list(texts[i : i + batch_size]), chat=chat, formatted=formatted)
        mask = enc["attention_mask"].bool()  # (B, T)
        if P > 1 and int(mask.sum(-1).min()) < P:
            raise SteerscopeError(f"read={read!r} needs at least {P} tokens per text; a text is shorter.")
        with record(lm, layers, kind) as acts:
            lm.forward(**enc)
        stack = torch.stack([acts[l] for l in layers], dim=1).double()  # (B, L, T, d)
        if read == "mean":
            # The first real token is left out of the mean when a text has more: its residual
            # carries "massive activations" (Sun et al. 2024; on SmolLM2 one dimension of size
            # ~600 at layer 12 vs ~3 elsewhere) whose weight 1/len differs between texts of
            # different lengths, so a difference of means would point along that dimension.
            first = mask & (mask.long().cumsum(-1) == 1)
            mask = mask & ~(first & (mask.sum(-1, keepdim=True) > 1))
            m = mask[:, None, :, None].double()
            out.append(((stack * m).sum(2) / m.sum(2))[:, None].cpu())  # (B, 1, L, d)
        else:  # left padding: the last P columns are every row's last P real tokens
            out.append(stack[:, :, -P:].permute(0, 2, 1, 3).cpu())  # (B, P, L, d)
        if progress is not None:
            progress.update(len(enc["input_ids"]))
    return torch.cat(out)


@torch.no_grad()
def read_layer(lm, layer: int, ids: torch.Tensor, mask: torch.Tensor, site: str = "resid_post") -> torch.Tensor:
    """The activation at `layer`, stopping the forward pass there: later blocks and the
    unembedding (a large share of a small model's compute) are never run."""
    store = {}
    module, kind = lm.arch.resolve(Site(lm.check_layer(layer), site))  # type: ignore[arg-type]

    def stop(x):
        store["x"] = x
        raise StopForward

    try:
        with hooks([(module, kind, stop)]):
            lm.forward(ids, mask)
    except StopForward:
        pass
    return store["x"]


NEUTRAL_TEXTS = (
    "The weather today is mild and the streets are quiet.",
    "Please summarise the main points of the meeting.",
    "A recipe needs flour, water, salt and time.",
    "Explain how a bicycle stays upright.",
)


@torch.no_grad()
def residual_norms(lm, texts: Sequence[str] = NEUTRAL_TEXTS) -> torch.Tensor:
    """(n_layers,) float32 median L2 norm of the residual stream (resid_post) per layer over the
    real tokens of `texts`, the first token of each left out (the attention sink: its norm is
    often 10-1000x the rest). The scale against which a steering vector's size means something."""
    layers = list(range(lm.n_layers))
    enc = lm.encode(list(texts), chat=False)
    keep = enc["attention_mask"].bool().clone()  # (B, T)
    first = keep.long().argmax(-1)  # each row's first real token
    keep[torch.arange(keep.shape[0]), first] = False
    with record(lm, layers) as acts:
        lm.forward(**enc)
    return torch.stack([acts[l].float().norm(dim=-1)[keep.to(acts[l].device)].median().cpu() for l in layers])
