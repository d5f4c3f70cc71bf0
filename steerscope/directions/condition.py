"""Condition vectors (CAST, Lee et al. 2025) as saved files, and the `when` of a steering entry.

A condition set is a `VectorSet` with method "condition": one vector per candidate layer (ids
`condition-L{layer}`), each the direction a prompt's mean hidden state at that layer is compared
with. Its hyperparams hold, per layer, the threshold that best separated the two prompt sets on a
validation split and its side:

    hyperparams = {"condition": {"<layer>": {"threshold": t, "above": true, "auc": a, ...}},
                   "best_layer": L, ...}

`when_condition` turns a set plus a steering entry's `when` ({"condition": NAME, "layer": L,
"threshold": t, "above": true}; layer, threshold and above default to the file's) into the
`interventions.conditional.Condition` the per-row machinery gates on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SteerscopeError
from ..interventions.conditional import Condition
from .vectors import VectorSet

METHOD = "condition"


def layer_id(layer: int) -> str:
    return f"condition-L{layer}"


@dataclass(frozen=True)
class When:
    """A steering entry's gate, as a user writes it (every field but the set is optional)."""

    condition: str
    """the condition set: a saved folder (CLI) or a stored vector name (server)"""
    layer: int | None = None
    """condition layer (default: the set's best layer)"""
    threshold: float | None = None
    """cosine threshold (default: the one the set found at that layer)"""
    above: bool | None = None
    """steer when the score is above the threshold (default: the set's side at that layer)"""


def is_condition_set(vs: VectorSet) -> bool:
    return vs.config.method == METHOD and isinstance(vs.config.hyperparams.get("condition"), dict)


def when_condition(vs: VectorSet, when: When) -> Condition:
    """The `Condition` a `when` entry asks for; one clear error naming the field otherwise."""
    if not is_condition_set(vs):
        raise SteerscopeError(
            f"when.condition: {when.condition!r} is not a condition set (method {vs.config.method!r}); "
            "make one with `steerscope condition --sets ON OFF`."
        )
    per_layer = {int(k): v for k, v in vs.config.hyperparams["condition"].items()}
    layer = when.layer if when.layer is not None else vs.config.hyperparams.get("best_layer")
    if layer not in per_layer or layer_id(layer) not in vs.ids:
        raise SteerscopeError(
            f"when.layer: {when.condition!r} has no condition vector at layer {layer}; "
            f"it has layers {', '.join(map(str, sorted(per_layer)))}."
        )
    saved = per_layer[layer]
    threshold = when.threshold if when.threshold is not None else saved.get("threshold")
    above = when.above if when.above is not None else saved.get("above", True)
    if threshold is None:
        raise SteerscopeError(f"when.threshold: {when.condition!r} records none at layer {layer}; give one.")
    return Condition(vs[layer_id(layer)].vector, layer=layer, threshold=float(threshold), above=bool(above))


def condition_set(lm, vectors, layers: list[int], per_layer: dict[int, dict], best_layer: int, **hyper) -> VectorSet:
    """A condition set in the format above: `vectors` (L, d) one per layer of `layers`, `per_layer`
    layer -> {"threshold", "above", "auc", ...}, `hyper` any further hyperparams (config, data)."""
    if best_layer not in per_layer:
        raise SteerscopeError(f"best_layer {best_layer} is not one of the fitted layers {sorted(per_layer)}.")
    params = {**hyper, "condition": {str(k): v for k, v in per_layer.items()}, "best_layer": int(best_layer)}
    return VectorSet.create(lm, vectors, list(layers), METHOD, ids=[layer_id(l) for l in layers], hyperparams=params)


FLAGS = {"when.condition": "--when", "when.layer": "--when-layer", "when.threshold": "--when-threshold"}


def check_encoding(vs: VectorSet, lm, chat: bool | None, where: str) -> None:
    """The set's thresholds hold only for prompts encoded as at fit time: with the chat template or
    without (the template's tokens are in the mean the gate reads). One line naming `where` when
    the steering's encoding differs. A set without a recorded fit (made by hand) is not checked."""
    fit = vs.config.hyperparams.get("fit")
    if not isinstance(fit, dict) or "chat" not in fit:
        return
    fitted = lm.has_chat_template if fit["chat"] is None else bool(fit["chat"])
    used = lm.has_chat_template if chat is None else bool(chat)
    if fitted != used:
        how = "with" if fitted else "without"
        raise SteerscopeError(
            f"{where}: the condition set was fitted on prompts {how} the chat template, but these prompts are encoded "
            f"{'with' if used else 'without'} it, so its thresholds do not apply; encode them {how} it "
            f"or fit the set {'with --no-chat' if used is False else 'with the chat template'}."
        )


def load_when(
    folder: str | Path, lm, when: When, *, check_model: bool = True, chat: bool | None | str = "unchecked"
) -> Condition:
    """The `Condition` the command-line flags --when FOLDER [--when-layer L] [--when-threshold T]
    ask for (`generate`, `bench`, `run`); every error is one line naming the flag. `chat`: how the
    prompts it gates are encoded (`check_encoding`; "unchecked" skips the check)."""
    if not Path(folder).is_dir():
        raise SteerscopeError(f"--when {folder}: no such folder; give a condition set made by `steerscope condition`.")
    vs = VectorSet.load(folder, lm, check_model=check_model)
    if chat != "unchecked":
        check_encoding(vs, lm, chat, f"--when {folder}")
    try:
        return when_condition(vs, when)
    except SteerscopeError as e:
        field, _, rest = str(e).partition(":")
        raise SteerscopeError(f"{FLAGS.get(field, '--when')}:{rest}") from None


def check_when_flags(cfg) -> None:
    """--when-layer / --when-threshold / --when-below without --when: one line, before any work.
    `cfg`: a command config with the fields when, when_layer, when_threshold, when_below."""
    if not cfg.when and (cfg.when_layer is not None or cfg.when_threshold is not None or cfg.when_below):
        raise SteerscopeError("--when-layer, --when-threshold and --when-below need --when FOLDER (a condition set).")


def when_from_flags(cfg, lm, *, chat, check_model: bool = True) -> Condition | None:
    """The `Condition` a command's --when flags ask for (None without --when; `load_when` checks
    the set, its layer and the prompts' encoding `chat`)."""
    check_when_flags(cfg)
    if not cfg.when:
        return None
    when = When(cfg.when, cfg.when_layer, cfg.when_threshold, False if cfg.when_below else None)
    return load_when(cfg.when, lm, when, check_model=check_model, chat=chat)
