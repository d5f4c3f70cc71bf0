"""`steer(lm, *interventions)`: apply interventions for the duration of a `with` block.

Order of composition: hooks run in forward order of their sites; several interventions at the
same site run in the order they were passed to `steer` (and nested `steer` blocks run the outer
block's hooks first). An `Ablate()` at every layer placed before an `Add` at layer L therefore
does not remove the added vector at layer L, but it is removed again at the input of block L+1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ..errors import SteerscopeError
from ..models.hooks import hooks
from .ops import Intervention
from .positions import StepState


def _flatten(items: Iterable) -> list[Intervention]:
    out: list[Intervention] = []
    for it in items:
        if it is None:
            continue
        if isinstance(it, (list, tuple)):
            out.extend(_flatten(it))
        elif isinstance(it, Intervention):
            out.append(it)
        else:
            raise SteerscopeError(f"not an intervention: {type(it).__name__}; use Add, Ablate or Clamp.")
    return out


@contextmanager
def steer(lm, *interventions, prompt_len=None) -> Iterator[StepState]:
    """Example::

        with steer(lm, Add(vec, layer=7, coef=4.0), Ablate(refusal_dir)):
            out = lm.model.generate(**lm.encode(prompts), max_new_tokens=20)

    Every hook is removed when the block exits, also on an exception. Yields the `StepState`
    (token positions of the latest forward call), which is mostly useful for debugging.

    `prompt_len`: (batch,) prompt lengths, when the forward calls inside the block do not start
    with the prompt pass (a decode loop that enters `steer` per step, or decoding without a KV
    cache); "prompt"/"generated" positions then use these lengths.
    """
    items = _flatten(interventions)
    state = StepState(prompt_len)

    def build():
        specs = [(lm.arch.base, "observe", state.observe)]
        for iv in items:
            specs.extend(iv.hook_specs(lm, state))
        return specs

    with hooks(build):
        yield state
