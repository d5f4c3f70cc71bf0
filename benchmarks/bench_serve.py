"""Serving throughput with a different steering vector per request (issues 12 and 31).

Starts `steerscope serve` in-process on 127.0.0.1 (a free port). First it checks, then it times:
  check      `--check` requests, each with its own vector and one of several prompt lengths, sent
             all at once; each output must equal the same request sent alone. The share that
             does is reported; anything below 100 % fails the benchmark before any timing.
Then, for N = 1, 8, 32, 64 concurrent clients, it measures three modes in one run, alternating
them so machine noise hits all alike:
  none       every request unsteered
  shared     every request steered by the same vector
  distinct   request i steered by its own vector i (N distinct vectors in a batch)
Each client sends `--rounds` requests one after the other (chat, greedy, `ignore_eos` so every
request decodes exactly `--tokens` tokens). Reported per mode: completion tokens/s over the whole
wave, and p50/p95 request latency; the ratio distinct/none is the number issue 12 targets
(>= 0.9 at N = 32). For scale, the same N prompts decoded by `generate` in one batch (no HTTP,
no scheduler) give the ceiling. The mixed load test (good, bad and cancelled requests; `--load N`) checks that
no request gets a 5xx, no hook is left and memory stays flat.

    python benchmarks/bench_serve.py                  # SmolLM2-135M, float32, N = 1 8 32
    python benchmarks/bench_serve.py --dtype bfloat16 --clients 32 --load 300
Results are merged into benchmarks/results/serve.json (keyed by device and dtype).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from serve_loadtest import mixed_load  # noqa: E402  (beside this file)

from steerscope import generate, load_model  # noqa: E402
from steerscope.directions.vectors import VectorSet  # noqa: E402
from steerscope.models.hooks import count_hooks  # noqa: E402
from steerscope.serving.app import Server  # noqa: E402
from steerscope.serving.config import ServeConfig  # noqa: E402

PROMPTS = [
    "Tell me about your weekend.",
    "What is a good name for a cat?",
    "Explain why the sky is blue.",
    "Write one sentence about the sea.",
    "Give me a tip for cooking rice.",
    "What should I read next?",
    "Describe a busy train station.",
    "How do bees make honey?",
]


async def wave(url: str, n: int, rounds: int, tokens: int, mode: str) -> dict:
    import httpx

    lat: list[float] = []
    done = 0

    async def client(i: int, c: httpx.AsyncClient) -> None:
        nonlocal done
        for r in range(rounds):
            body = {
                "model": "steerscope",
                "messages": [{"role": "user", "content": PROMPTS[(i + r) % len(PROMPTS)]}],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            if mode == "shared":
                body["steering"] = [{"vector": "bench/v0", "coef": 4.0}]
            elif mode == "distinct":
                body["steering"] = [{"vector": f"bench/v{i}", "coef": 4.0}]
            t0 = time.perf_counter()
            resp = await c.post(url + "/v1/chat/completions", json=body)
            resp.raise_for_status()
            lat.append(time.perf_counter() - t0)
            done += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, c) for i in range(n)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {
        "tokens": done,
        "seconds": wall,
        "tok_s": done / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))],
    }


CHECK_PROMPTS = [
    "Hi",
    "What is two plus two?",
    "Tell me about your weekend.",
    "Write a long and detailed paragraph about the history of the bicycle in Europe, please.",
]


def equality_check(url: str, n: int, tokens: int) -> dict:
    """n requests (request i: its own vector bench/v{i}, prompt i mod 4, coefficient varying)
    sent concurrently, then one at a time; the share whose token ids are equal."""
    import httpx

    bodies = [
        {
            "model": "steerscope",
            "messages": [{"role": "user", "content": CHECK_PROMPTS[i % len(CHECK_PROMPTS)]}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "steering": [{"vector": f"bench/v{i}", "coef": 2.0 + (i % 5)}],
        }
        for i in range(n)
    ]

    async def send(c, body):
        r = await c.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["steerscope"]["token_ids"]

    async def together():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 4)) as c:
            return await asyncio.gather(*(send(c, b) for b in bodies))

    async def alone():
        async with httpx.AsyncClient(timeout=600) as c:
            return [await send(c, b) for b in bodies]

    both, one = asyncio.run(together()), asyncio.run(alone())
    equal = sum(a == b for a, b in zip(both, one))
    first = next((i for i, (a, b) in enumerate(zip(both, one)) if a != b), None)
    return {
        "requests": n,
        "equal": equal,
        "share": equal / n,
        "tokens": tokens,
        "first_difference": None
        if first is None
        else {"request": first, "prompt": bodies[first]["messages"][0]["content"]},
    }


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss_mb()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument(
        "--check",
        type=int,
        default=32,
        help="requests in the equality check (0: skip; never skip for numbers you report)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternations of the three modes per N")
    ap.add_argument("--layer", type=int, default=None, help="steering layer (default: middle)")
    ap.add_argument("--load", type=int, default=200, help="requests in the mixed load test (0: skip)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    if max(args.clients) > 64 or args.rounds * args.tokens > 4096:
        raise SystemExit("bench_serve is bounded: at most 64 clients and rounds x tokens <= 4096.")

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    K = max(*args.clients, 2)
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(K, lm.d_model, generator=g)
    vecs = vecs / vecs.norm(dim=-1, keepdim=True) * 8.0  # (K, d): distinct directions, one norm
    layer = lm.n_layers // 2 if args.layer is None else args.layer
    vs = VectorSet.create(lm, vecs, layer, "random", ids=[f"v{i}" for i in range(K)])
    cfg = ServeConfig(port=0, max_batch=max(32, K), max_tokens_limit=max(1024, args.tokens))
    rows = []
    with Server(lm, cfg) as srv:
        srv.store.add("bench", vs)
        asyncio.run(wave(srv.url, 2, 1, 4, "distinct"))  # warm-up
        check = equality_check(srv.url, min(args.check, K), args.tokens) if args.check else None
        if check is not None:
            print(
                f"check: {check['equal']} of {check['requests']} concurrent requests equal the same request sent alone "
                f"({100 * check['share']:.1f} %)",
                flush=True,
            )
            if check["share"] < 1.0:
                raise SystemExit(
                    f"bench_serve: concurrent outputs differ from the same requests alone "
                    f"(first: {check['first_difference']}); not timing a wrong server."
                )
        for n in args.clients:
            runs: dict[str, list[dict]] = {"none": [], "shared": [], "distinct": []}
            for _ in range(args.repeats):
                for mode in runs:
                    runs[mode].append(asyncio.run(wave(srv.url, n, args.rounds, args.tokens, mode)))
            agg = {}
            for mode, rs in runs.items():
                tok, sec = sum(r["tokens"] for r in rs), sum(r["seconds"] for r in rs)
                agg[mode] = {
                    "tok_s": round(tok / sec, 1),
                    "p50_s": round(statistics.median(r["p50_s"] for r in rs), 3),
                    "p95_s": round(max(r["p95_s"] for r in rs), 3),
                }
            # the ceiling: the same N prompts decoded by `generate` in one batch, no HTTP, no scheduler
            t0 = time.perf_counter()
            made = sum(
                len(c.token_ids)
                for _ in range(args.rounds)
                for c in generate(
                    lm,
                    [PROMPTS[i % len(PROMPTS)] for i in range(n)],
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                )
            )
            direct = made / (time.perf_counter() - t0)
            row = {
                "clients": n,
                **agg,
                "direct_generate_tok_s": round(direct, 1),
                "none_over_direct": round(agg["none"]["tok_s"] / direct, 3),
                "distinct_over_none": round(agg["distinct"]["tok_s"] / agg["none"]["tok_s"], 3),
                "shared_over_none": round(agg["shared"]["tok_s"] / agg["none"]["tok_s"], 3),
            }
            rows.append(row)
            print(
                f"N={n:>3}  none {agg['none']['tok_s']:7.1f} tok/s (p50 {agg['none']['p50_s']:.2f}s p95 {agg['none']['p95_s']:.2f}s)"
                f"  shared {agg['shared']['tok_s']:7.1f}  distinct {agg['distinct']['tok_s']:7.1f} tok/s"
                f" (p50 {agg['distinct']['p50_s']:.2f}s p95 {agg['distinct']['p95_s']:.2f}s)"
                f"  distinct/none {row['distinct_over_none']:.3f}  (generate() alone: {direct:.1f} tok/s)",
                flush=True,
            )
        load = None
        if args.load:
            good = {
                "model": "steerscope",
                "messages": [{"role": "user", "content": "Say something."}],
                "max_tokens": 8,
                "temperature": 0,
                "steering": [{"vector": "bench/v1", "coef": 4.0}],
            }
            before = current_rss_mb()
            first = mixed_load(srv.url, good, n=args.load, concurrency=16, seconds=600, seed=1)
            mid = current_rss_mb()
            second = mixed_load(srv.url, good, n=args.load, concurrency=16, seconds=600, seed=2)
            after = current_rss_mb()
            time.sleep(0.5)
            load = {
                "requests": 2 * args.load,
                "outcomes": dict(first.outcomes + second.outcomes),
                "server_errors": first.server_errors + second.server_errors,
                "unexpected": (first.unexpected + second.unexpected)[:5],
                "seconds": round(first.seconds + second.seconds, 1),
                "rss_mb": [round(before), round(mid), round(after)],
                "hooks_left": count_hooks(lm.model),
                "rows_left": srv.engine.busy_rows,
            }
            print(
                f"load: {load['requests']} mixed requests in {load['seconds']} s: {load['outcomes']}; "
                f"5xx/error events {load['server_errors']}; RSS MB before/after wave 1/after wave 2 {load['rss_mb']}; "
                f"hooks left {load['hooks_left']}; rows left {load['rows_left']}",
                flush=True,
            )
    device = (
        torch.cuda.get_device_name()
        if lm.device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()}"
    )
    key = f"{lm.model_id}|{args.dtype}|{lm.device.type}"
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    import transformers

    data[key] = {
        "device": device,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "layer": layer,
        "check": check,
        "rows": rows,
        "load": load,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
