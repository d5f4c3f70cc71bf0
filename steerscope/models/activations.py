"""Reading residual-stream activations through hooks (see `registry` for what a layer is)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch

from ..errors import SteerscopeError
from .hooks import StopForward, hooks
from .registry import Site, SiteKind

Read = Literal["last", "mean"]


@contextmanager
def record(lm, layers: Sequence[int], kind: SiteKind = "resid_post", detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
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


@torch.no_grad()
def get_activations(lm, prompts: Sequence[str], layers: Sequence[int], *, read: Read = "last",
                    chat: bool | None = False, batch_size: int = 16, kind: SiteKind = "resid_post") -> torch.Tensor:
    """(n_prompts, n_layers, d_model) float32 activations, one forward pass per batch for all
    layers. `read`: the last real token, or the mean over real tokens (padding excluded)."""
    if read not in ("last", "mean"):
        raise SteerscopeError(f"read must be 'last' or 'mean', got {read!r}.")
    if len(prompts) == 0:
        raise SteerscopeError("the prompt list is empty; give at least one prompt.")
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = lm.encode(list(prompts[i:i + batch_size]), chat=chat)
        with record(lm, layers, kind) as acts:
            lm.forward(**enc)
        mask = enc["attention_mask"].bool()  # (B, T)
        stack = torch.stack([acts[lm.check_layer(l)] for l in layers], dim=1).float()  # (B, L, T, d)
        if read == "last":
            out.append(stack[:, :, -1])  # left padding: the last column is every row's last real token
        else:
            m = mask[:, None, :, None].float()
            out.append((stack * m).sum(2) / m.sum(2))
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
