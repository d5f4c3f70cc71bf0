"""Tiny random-initialised models of several architectures, built from configs (no downloads),
with a character-level tokenizer made in-process."""

from __future__ import annotations

import functools
import string

import pytest
import torch

from steerscope.models.lm import LM, weights_fingerprint

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"

# The five architectures the full contract table runs on, and the rest of the registry.
CORE_ARCHS = ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox"]
ALL_ARCHS = CORE_ARCHS + ["mistral", "qwen3", "gemma", "gemma3_text", "phi3", "olmo2"]


def _config(model_type: str, n_layers: int = 3):
    from transformers import AutoConfig

    ids = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if model_type == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=n_layers, n_head=4, vocab_size=VOCAB, n_positions=128, **ids
        )
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        **ids,
    )
    if model_type != "gpt_neox":
        kw["num_key_value_heads"] = 2
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        kw["head_dim"] = 8
    return AutoConfig.for_model(model_type, **kw)


@functools.cache
def _tokenizer(chat: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,!?'-:;()<>/\n"
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_lm(model_type: str, n_layers: int = 3, seed: int = 0, chat: bool = False) -> LM:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(model_type, n_layers))
    # Random init uses std 0.02, which makes every logit nearly equal; larger weights give a model
    # whose outputs actually depend on the residual stream, so a no-op would be noticed.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.eval()
    return LM(model, _tokenizer(chat), model_id=f"tiny-{model_type}", fingerprint=weights_fingerprint(model))


def finetuned(lm: LM, seed: int = 0, scale: float = 3.0, blocks: tuple[int, ...] = (0,)) -> tuple[LM, torch.Tensor]:
    """A copy of `lm` "fine-tuned" by a rank-1 change to the attention output projection of each of
    `blocks`: W += scale * u v^T, one unit residual direction u shared by the blocks (what
    weightdiff must find). Returns (the copy, u)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(lm.d_model, generator=g)
    u /= u.norm()
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for b in blocks:
            mod = model.get_submodule(f"{lm.arch.spec.layers}.{b}.{lm.arch.spec.attn_out}")
            w = mod.weight  # nn.Linear (out=d, in); GPT-2's Conv1D (in, out=d)
            v = torch.randn(w.shape[1] if type(mod).__name__ != "Conv1D" else w.shape[0], generator=g)
            v /= v.norm()
            w += scale * (torch.outer(u, v) if type(mod).__name__ != "Conv1D" else torch.outer(v, u))
    ft = LM(model, lm.tokenizer, model_id=lm.model_id + "-ft", fingerprint=weights_fingerprint(model))
    return ft, u


def needs_base(method: str) -> bool:
    """A discovery method that compares the model with its base (a `base` setting: weightdiff, actdiff)."""
    import dataclasses

    from steerscope.directions.discovery import DISCOVERY

    cls = DISCOVERY.get(method).config
    return cls is not None and "base" in {f.name for f in dataclasses.fields(cls)}


@functools.cache
def tiny_lm(model_type: str) -> LM:
    return make_tiny_lm(model_type)


@pytest.fixture(params=CORE_ARCHS)
def lm(request) -> LM:
    return tiny_lm(request.param)


@pytest.fixture(params=ALL_ARCHS)
def any_lm(request) -> LM:
    return tiny_lm(request.param)


PROMPTS = ["Hello there", "A much longer prompt with more tokens", "Hi"]


def rand_vec(lm: LM, seed: int = 1, scale: float = 4.0, rows: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (lm.d_model,) if rows is None else (rows, lm.d_model)
    return torch.randn(shape, generator=g) * scale / lm.d_model**0.5


DEVICES = (
    ["cpu"]
    + (["cuda"] if torch.cuda.is_available() else [])
    + (["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else [])
)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """Every available device; the CUDA row is skipped where torch sees no GPU."""
    if request.param not in DEVICES:
        pytest.skip(f"no {request.param} device here")
    return request.param


def tiny_on(model_type: str, device: str, chat: bool = False) -> LM:
    """A fresh tiny model on `device` (not the cached CPU one)."""
    lm = make_tiny_lm(model_type, chat=chat)
    lm.model.to(device)
    return lm


def chrome(width: int = 1300, height: int = 2000):
    """Headless Chromium through Selenium and Debian's chromium-driver; skipped where there is
    none, except in CI (which must install it)."""
    import os
    import shutil

    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (.ci/run does).")
        pytest.skip("no chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(chromedriver), options=opts)


def split_map(lm, second: str = "disk") -> dict:
    """Every top-level module on cpu, the later half of the blocks on `second`."""
    layers = lm.arch.spec.layers  # e.g. "model.layers"
    parent = layers.rsplit(".", 1)[0]
    dm = {}
    for name, _ in lm.model.named_children():
        if name != parent.split(".")[0]:
            dm[name] = "cpu"
    for name, _ in lm.model.get_submodule(parent).named_children():
        full = f"{parent}.{name}"
        if full == layers:
            for i in range(lm.n_layers):
                dm[f"{layers}.{i}"] = "cpu" if i < lm.n_layers // 2 + 1 else second
        else:
            dm[full] = "cpu"
    return dm


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny llama saved as a Hugging Face checkpoint folder, for the CLI's --model PATH."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    lm = make_tiny_lm("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
