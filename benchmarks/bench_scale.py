"""Scale: a random-initialised model with a ~1B-parameter Llama config (no download), on this
machine's device(s), optionally split by an accelerate device map (issue 14).

Measures, in one run:
  gen    K vectors x P prompts steered generation (`generate`, one batched pass, KV cache):
         completion tokens/s, and the same P prompts unsteered (the ratio is the steering cost)
  melbo  one MELBO step (K vectors x P prompts, layers s..t, forward + backward) in seconds
  memory peak resident memory of this process and, on CUDA, peak allocated memory per GPU

    python benchmarks/bench_scale.py                              # CPU, bfloat16
    python benchmarks/bench_scale.py --device cuda                # one GPU
    python benchmarks/bench_scale.py --device-map auto            # split across every GPU (+ CPU)
Results are merged into benchmarks/results/scale.json, keyed by device and dtype.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from steerscope import generate, load_model  # noqa: E402
from steerscope.directions.data import load_prompts  # noqa: E402
from steerscope.directions.discovery.melbo import train_melbo  # noqa: E402
from steerscope.directions.vectors import VectorSet  # noqa: E402
from steerscope.models.device import parse_dtype  # noqa: E402
from steerscope.models.layer_range import LayerRange  # noqa: E402
from steerscope.models.lm import LM, weights_fingerprint  # noqa: E402
from steerscope.models.placement import devices, dispatch  # noqa: E402


def build(args) -> LM:
    """A ~1.2B-parameter Llama (hidden 2048, 16 layers, MLP 8192) with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_model().tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 256,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    dt = parse_dtype(args.dtype)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dt)
    model.eval()
    if args.device_map:
        model = dispatch(model, args.device_map)
    else:
        model = model.to(args.device)
    return LM(model, tok, model_id=f"random-llama-{args.hidden}x{args.layers}", fingerprint=weights_fingerprint(model))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--device-map", default=None)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--K", type=int, default=8, help="vectors")
    ap.add_argument("--P", type=int, default=4, help="prompts")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--melbo-steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = build(args)
    n_params = sum(p.numel() for p in lm.model.parameters())
    built = time.perf_counter() - t0
    print(
        f"model: {n_params / 1e9:.2f} B parameters, {args.dtype}, on {devices(lm.model)}; built in {built:.0f} s",
        flush=True,
    )
    prompts = load_prompts("neutral")[: args.P]
    L = lm.n_layers // 2
    g = torch.Generator().manual_seed(0)
    vs = VectorSet.create(lm, torch.randn(args.K, lm.d_model, generator=g), L, "random")
    generate(lm, prompts[:1], max_new_tokens=2)  # warm-up
    sync()
    t = time.perf_counter()
    base = generate(lm, prompts, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    sync()
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    steered = generate(
        lm,
        prompts,
        vectors=vs,
        coef=1.0,
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        include_unsteered=False,
        batch_size=args.K * args.P,
    )
    sync()
    t_steer = time.perf_counter() - t
    tok_base = sum(len(c.token_ids) for c in base) / t_base
    tok_steer = sum(len(c.token_ids) for c in steered) / t_steer
    print(
        f"gen: {args.K} vectors x {args.P} prompts x {args.tokens} tokens in one pass: {tok_steer:.1f} tok/s "
        f"({t_steer:.1f} s); {args.P} prompts unsteered: {tok_base:.1f} tok/s",
        flush=True,
    )
    s, tt = max(0, L - 4), min(lm.n_layers - 1, L + 4)
    lr = LayerRange(lm, prompts, s, tt)
    train_melbo(lr, n_vectors=args.K, R=4.0, steps=1)  # warm-up
    sync()
    t = time.perf_counter()
    train_melbo(lr, n_vectors=args.K, R=4.0, steps=args.melbo_steps)
    sync()
    melbo = (time.perf_counter() - t) / args.melbo_steps
    print(f"melbo: one step, {args.K} vectors x {args.P} prompts, layers {s}..{tt}: {melbo:.2f} s", flush=True)
    mem = {"cpu_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            mem[f"cuda:{i}_peak_gb"] = round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
    print(f"memory: {mem}", flush=True)
    where = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and lm.device.type == "cuda"
        else f"{platform.machine()} CPU x{torch.get_num_threads()}"
    )
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[f"{where}|{args.dtype}|{args.device_map or args.device}"] = {
        "params_b": round(n_params / 1e9, 3),
        "K": args.K,
        "P": args.P,
        "tokens": args.tokens,
        "gen_steered_tok_s": round(tok_steer, 2),
        "gen_unsteered_tok_s": round(tok_base, 2),
        "melbo_step_s": round(melbo, 3),
        "memory": mem,
        "devices": devices(lm.model),
        "build_s": round(built, 1),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
