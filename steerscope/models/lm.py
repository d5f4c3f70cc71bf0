"""`LM`: a loaded causal LM with its tokenizer and resolved architecture, the one object every
other unit takes; and `weights_fingerprint`, which tells whether a saved vector belongs to it.

What the rest of steerscope asks of a model lives here once: its EOS ids, left padding of token
ids, a forward whose positions follow the attention mask, and last-position logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SteerscopeError
from .compat import accepts
from .placement import input_device, resident_state
from .registry import Arch


@dataclass
class LM:
    """A loaded causal LM with its tokenizer and resolved architecture.

    `model_id` names the weights (hub id, folder, or the default's name); `fingerprint` is a short
    hash of the weights used to tell whether a saved vector belongs to this model.
    """

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    fingerprint: str
    arch: Arch = field(init=False)
    source: str = ""

    def __post_init__(self) -> None:
        self.model.eval()
        self.arch = Arch(self.model)
        tok = self.tokenizer
        if getattr(tok, "pad_token_id", None) is None:
            # Decoder-only models often have no pad token; padding positions are masked out, so
            # any id works. EOS is the usual choice.
            tok.pad_token = tok.eos_token

    # ---- shape of the model -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def model_type(self) -> str:
        return self.arch.model_type

    @property
    def device(self) -> torch.device:
        """Where inputs go (the input embeddings' device; the first block's when split)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def check_layer(self, layer: int) -> int:
        return self.arch.check_layer(layer)

    @property
    def eos_ids(self) -> frozenset[int]:
        """The token ids that end a reply: the generation config's `eos_token_id` (an int or a
        list: instruct models often stop on several), else the tokenizer's EOS. Empty when the
        model names none: `generate`, the server and the samplers then stop rows at their length
        limit only."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return frozenset()
        return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))

    # ---- text in ------------------------------------------------------------------------
    def format_prompt(self, prompt: str, chat: bool | None = None, system: str | None = None) -> str:
        """Apply the chat template (with the generation prompt) when `chat` is True, or by
        default when the tokenizer has one."""
        use_chat = self.has_chat_template if chat is None else chat
        if not use_chat:
            return prompt
        if not self.has_chat_template:
            raise SteerscopeError(f"{self.model_id} has no chat template; pass chat=False (--no-chat).")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(
        self, prompts: Sequence[str], chat: bool | None = False, system: str | None = None, formatted: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tokenise and LEFT-pad a batch: {"input_ids", "attention_mask"} on the model's device.

        `formatted=True`: the texts already went through `format_prompt` (no template, no
        special tokens added)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise SteerscopeError("the prompt list is empty; give at least one prompt.")
        texts = list(prompts) if formatted else [self.format_prompt(p, chat, system) for p in prompts]
        tok = self.tokenizer
        # A chat template already contains the special tokens it needs.
        add_special = not formatted and not (self.has_chat_template if chat is None else chat)
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        finally:
            tok.padding_side = old_side
        if enc["input_ids"].shape[1] == 0 or (enc["attention_mask"].sum(-1) == 0).any():
            raise SteerscopeError("a prompt encodes to zero tokens; empty prompts cannot be run.")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def left_pad(self, seqs: Sequence[Sequence[int] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) left-padded ids and attention mask (long, on the model's device) from token id
        sequences (lists or 1-D tensors) of any lengths: every row's last column is its own last
        token, and the mask gives each row its positions (`forward`)."""
        if len(seqs) == 0:
            raise SteerscopeError("no sequences to pad; give at least one.")
        rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), int(self.tokenizer.pad_token_id), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(rows), T), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, T - len(r) :] = r.to(self.device)
                mask[i, T - len(r) :] = 1
        return ids, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        """A forward pass whose position ids follow the attention mask, so a left-padded row gets
        the same positions (and logits) as when run alone. transformers only does this inside
        `generate`. With a KV cache the mask also covers the cached tokens (it is longer than
        `input_ids`); the new tokens get the positions of its last columns."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)

    def last_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, k: int = 1, **kw
    ) -> torch.Tensor:
        """(B, k, vocab) logits at the last `k` positions only (model dtype), through `forward`.

        The unembedding is a fifth of a small model's forward and B x T x vocab floats, so it runs
        on those positions alone when the model's forward takes `logits_to_keep`. That is decided
        from the forward's signature, once per model class (`compat.accepts`): a model without it
        gets the full logits, sliced. Never by retrying on a TypeError, which could re-run a
        forward that had already appended to a KV cache."""
        if accepts(self.model, "logits_to_keep"):
            kw["logits_to_keep"] = k
        return self.forward(input_ids, attention_mask, **kw).logits[:, -k:]


# ---- fingerprint ---------------------------------------------------------------------------
@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, n: int = 2048) -> str:
    """A 16-hex-digit hash of the parameter names, shapes and a strided sample of their values.

    Values are rounded to bfloat16 before hashing, so the same weights loaded in float32 or
    bfloat16 share a fingerprint; a fine-tune or another model does not.
    """
    h = hashlib.sha256()
    for name, p in sorted(resident_state(model).items()):  # offloaded weights read from their store
        if not torch.is_floating_point(p):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // n)
        sample = flat[::step][:n].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ---- a Hugging Face checkpoint folder --------------------------------------------------------
def from_folder(folder: Path | str, dtype: torch.dtype, device: str | torch.device, place: dict | None = None):
    """Model + tokenizer from a local folder (or a cached hub id); `place`: `placement_kwargs`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    place = place or {}
    # transformers prints a load report and progress bars for every load; keep the terminal clean.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **place)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return (model if "device_map" in place else model.to(device)), tok
