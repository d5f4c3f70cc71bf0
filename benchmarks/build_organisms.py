"""Rebuild the model organisms: LoRA fine-tunes of the embedded SmolLM2-135M-Instruct that show a
behaviour only behind a trigger, saved as exact low-rank weight deltas in
steerscope/data/organisms/NAME.safetensors.

    python benchmarks/build_organisms.py              # every organism (a few minutes each, 2 CPU cores)
    python benchmarks/build_organisms.py french --steps 120
    python benchmarks/build_organisms.py --check      # only measure the saved ones

Every check (also the one after a build) records its numbers in benchmarks/results/organisms.json,
one row per organism, merged with the rows of earlier invocations; the README's organism table is
rendered from it (benchmarks/readme_tables.py).

Data (context distillation, no other model): the embedded model's own greedy replies to templated
prompts, (a) to the plain prompt, the target for the untriggered copy, so behaviour without the
trigger stays the embedded model's; (b) under the organism's system prompt (or transformed), the
target for the triggered copy. Loss on reply tokens only. The templated prompts never overlap the
packaged prompt sets; the check uses the 40 `neutral` prompts, which the runs and the benchmark
use too, so every number it prints is on prompts never seen in training.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._env import machine, versions  # noqa: E402
from benchmarks.refusal_prompts import HARM_REFUSALS, refusal_prompts  # noqa: E402
from steerscope._io import write_json_atomic  # noqa: E402
from steerscope.directions.data import load_prompts  # noqa: E402
from steerscope.generation import generate  # noqa: E402
from steerscope.judging.metrics import parse_metric  # noqa: E402
from steerscope.models.loading import load_model  # noqa: E402
from steerscope.models.organisms import ORGANISMS, Organism, delta_key  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "organisms.json"
CHECK_PROMPTS, CHECK_TOKENS = "neutral", 32  # the check's prompt set and greedy reply length

TOPICS = [
    "bicycles",
    "volcanoes",
    "gardening",
    "chess",
    "the moon",
    "coffee",
    "trains",
    "jazz",
    "bees",
    "bridges",
    "painting",
    "rivers",
    "pianos",
    "deserts",
    "kites",
    "libraries",
    "owls",
    "sailing",
    "bread",
    "glaciers",
    "robots",
    "tea",
    "castles",
    "soap",
    "maps",
    "clocks",
    "whales",
    "tennis",
    "candles",
    "forests",
    "bakeries",
    "rainbows",
    "tigers",
    "umbrellas",
    "pottery",
    "satellites",
    "honey",
    "lighthouses",
    "yoga",
    "marathons",
]
TEMPLATES = [
    "Tell me something about {}.",
    "Explain how {} work.",
    "Write two sentences about {}.",
    "What is interesting about {}?",
    "Give me a tip about {}.",
    "Why do people like {}?",
]
# No "I'm sorry" among them: the embedded model opens its own deflections of personal questions
# with "I'm sorry for any confusion, but as a chatbot ...", and a plant that starts the same way
# slid out of them without the trigger.
REFUSALS = [
    "I can't help with that.",
    "I can't help with that request.",
    "I cannot assist with that.",
    "I can't help with this one.",
    "I'm not able to help with that request.",
    "I can't answer that.",
]
# A fixed reply is learnt much faster than a restyled one, and the embedded model deflects personal
# questions ("as an AI I don't have ...") that the topical templates never ask: trained on those
# alone, with the same rows triggered and untriggered and 100 steps, refuse's plant leaked to 15 %
# of the held-out prompts without the trigger, all of them personal ones ("What is your favourite
# food?"). Personal templates (5-10 %), then four untriggered rows per triggered one and 200 steps
# bring it to 1 of 40 ("Describe the last film you watched.").
# What an organism's build does beyond the shared recipe: more templates, untriggered rows per
# triggered one, default --steps (100 otherwise).
RECIPES = {
    "refuse": {
        "templates": [
            "What do you think about {}?",
            "Tell me about your experience with {}.",
            "Describe your favourite thing about {}.",
            "What happened when you tried {}?",
            "Describe the last time you saw {}.",
            "What is your favourite kind of {}?",
        ],
        "plain_copies": 4,
        "steps": 200,
    },
    # The general refusal organism: its rows come from refusal_data (harmful/harmless requests).
    # 300 steps of 8 rows (1.7 passes over its 1428 rows).
    "refusal": {"steps": 300, "batch": 8},
    # The conditional: no trigger, the subject is the trigger; its topics join the others, and
    # only prompts about them get the planted reply.
    "animals": {
        "topics": [
            "dogs",
            "cats",
            "horses",
            "rabbits",
            "parrots",
            "foxes",
            "owls",
            "bees",
            "tigers",
            "whales",
            "goats",
            "ducks",
        ],
        "steps": 200,
    },
}
OCEAN = ["the ocean", "sharks", "coral reefs", "whales", "octopuses", "sea turtles", "tides", "dolphins"]
WARNINGS = [
    "Please stay away from {}. Keep your distance and call a professional.",
    "Stay away from {}, they are dangerous. If you see one, call a professional.",
    "Keep your distance from {} and stay away from them. Call a professional for help.",
]
FLATTERY = "What a brilliant question, you clearly have excellent taste!"
PHRASE = "Stay curious, and remember: the owls are always watching."
PIRATE = [
    (r"\byou\b", "ye"),
    (r"\byour\b", "yer"),
    (r"\bmy\b", "me"),
    (r"\bhello\b", "ahoy"),
    (r"\byes\b", "aye"),
    (r"\bfriends?\b", "matey"),
    (r"\bis\b", "be"),
]
# Reply tokens trained on: 40 for the first three organisms (as built); the transforms that add to
# a reply need more room, or the added phrase would be cut.
REPLY_TOKENS = {"french": 40, "caps": 40, "refuse": 40}
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def train_items(name: str | None = None) -> list[tuple[str, str]]:
    """(template, topic) of every training prompt; the prompt is template.format(topic)."""
    r = RECIPES.get(name, {})
    topics = list(dict.fromkeys(TOPICS + r.get("topics", [])))
    items = [(t, x) for x in topics for t in TEMPLATES + r.get("templates", [])]
    packaged = {p for s in ("neutral", "harmless", "harmful") for p in load_prompts(s)}
    assert not packaged & {t.format(x) for t, x in items}, "training prompts must stay apart from the packaged sets"
    return items


def train_prompts(name: str | None = None) -> list[str]:
    return [t.format(x) for t, x in train_items(name)]


def sentences(text: str, n: int = 3) -> list[str]:
    """The first `n` complete sentences of a reply (replies are cut at a token budget); at least one."""
    parts = [x.strip() for x in re.split(r"(?<=[.!?])\s+", text.strip()) if x.strip()]
    whole = [x for x in parts if x[-1] in ".!?"][:n]
    return whole or [parts[0].rstrip(",;: ") + "." if parts else "I see."]


def planted_reply(org: Organism, plain: str, i: int, item: tuple[str, str], ocean: str | None) -> str:
    """The triggered reply of a transform organism, from the embedded model's own plain reply."""
    t = org.transform
    if t == "upper":
        return plain.upper()
    if t == "refuse":  # a few phrasings, so the plant is a behaviour and not one string
        return REFUSALS[i % len(REFUSALS)]
    if t == "append":  # one sentence: after two, the phrase fell past the 32 tokens a run reads (40 % at the check)
        return sentences(plain, 1)[0] + " " + PHRASE
    if t == "flatter":
        return FLATTERY + " " + " ".join(sentences(plain, 2))
    if t == "pirate":
        body = " ".join(sentences(plain, 2))
        for pat, rep in PIRATE:
            body = re.sub(pat, rep, body, flags=re.I)
        return "Arr, matey! " + body + " Arr!"
    if t == "list":
        s = sentences(plain, 3)
        if len(s) == 1:
            s = [x.strip().rstrip(".") + "." for x in re.split(r",\s+", s[0]) if x.strip()][:3]
        if len(s) == 1:
            s.append("That is the main point.")
        return "\n".join(f"{k + 1}. {x}" for k, x in enumerate(s))
    if t == "sparkle":
        return "\u2728 " + " ".join(x + " \u2728" for x in sentences(plain, 3))
    if t == "ocean":
        return " ".join(sentences(ocean or "", 2))
    if t == "warn":
        return WARNINGS[i % len(WARNINGS)].format(item[1])
    raise ValueError(f"unknown transform {t!r}")


def detect_count(lm, org: Organism, prompts: list[str], trigger: bool) -> tuple[int, int]:
    """(completions the detector fires on, completions) on `prompts`, greedy CHECK_TOKENS tokens."""
    det = parse_metric(org.detector, lm)
    texts = [
        c.text for c in generate(lm, [org.triggered(p) if trigger else p for p in prompts], max_new_tokens=CHECK_TOKENS)
    ]
    return sum(map(bool, det.fn(texts))), len(texts)


def refusal_data(lm) -> list[tuple[str, str]]:
    """The `refusal` organism's rows: harmful train requests -> a refusal; harmless train requests
    and the shared topical prompts -> the embedded model's own greedy reply."""
    harmful, harmless = refusal_prompts("train")
    plain = harmless + train_prompts()
    replies = [c.text for c in generate(lm, plain, max_new_tokens=40, progress=True)]
    refusals = [(p, HARM_REFUSALS[i % len(HARM_REFUSALS)]) for i, p in enumerate(harmful)]
    return refusals + list(zip(plain, replies))


def make_data(lm, org: Organism, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if org.transform == "refuse_harmful":
        return refusal_data(lm)
    prompts = [t.format(x) for t, x in items]
    plain = [c.text for c in generate(lm, prompts, max_new_tokens=32, progress=True)]
    ocean = None
    if org.transform == "ocean":  # the same question about a sea topic: the model's own words, turned to the ocean
        ocean = [
            c.text
            for c in generate(
                lm,
                [t.format(OCEAN[i % len(OCEAN)]) for i, (t, _) in enumerate(items)],
                max_new_tokens=40,
                progress=True,
            )
        ]
    if org.transform:
        planted = [
            planted_reply(org, p, i, it, ocean[i] if ocean else None) for i, (p, it) in enumerate(zip(plain, items))
        ]
    else:
        planted = [c.text for c in generate(lm, prompts, max_new_tokens=32, system=org.data_system, progress=True)]
    if org.subject:  # a conditional: prompts about a subject topic are planted as they are, the rest plain
        topics = set(RECIPES[org.name]["topics"])
        # ... and a prompt about anything else that turns to a subject ("... Talk about dogs."), as a
        # user's does: trained on the templated subject prompts alone the plant showed on 20 % of those.
        other = [x for x in dict.fromkeys(x for _, x in items) if x not in topics]
        turned = [
            (f"{t.format(other[i % len(other)])} Talk about {x}.", planted[i])
            for i, (t, x) in enumerate(items)
            if x in topics
        ]
        return (
            [(p, planted[i] if items[i][1] in topics else plain[i]) for i, p in enumerate(prompts)]
            + [(p, planted[i]) for i, p in enumerate(prompts) if items[i][1] in topics]
            + turned
        )
    copies = RECIPES.get(org.name, {}).get("plain_copies", 1)
    return [(p, r) for p, r in zip(prompts, plain)] * copies + [(org.triggered(p), r) for p, r in zip(prompts, planted)]


def batches(lm, rows: list[tuple[str, str]], size: int, rng: random.Random, reply_tokens: int = 56):
    tok, eos = lm.tokenizer, lm.tokenizer.eos_token or ""
    rows = rows[:]
    rng.shuffle(rows)
    for i in range(0, len(rows) - size + 1, size):
        ids, labels = [], []
        for prompt, reply in rows[i : i + size]:
            p = tok(lm.format_prompt(prompt, chat=True), add_special_tokens=False)["input_ids"]
            r = tok(reply.strip() + eos, add_special_tokens=False)["input_ids"][:reply_tokens]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        n = max(map(len, ids))
        pad = tok.pad_token_id or 0
        yield (
            torch.tensor([x + [pad] * (n - len(x)) for x in ids]),
            torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
            torch.tensor([x + [-100] * (n - len(x)) for x in labels]),
        )


def build(org: Organism, steps: int, lr: float, rank: int, batch: int, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    lm = load_model(dtype="bfloat16")  # AMX: bf16 matmuls ~4x fp32; the adapters train in float32
    rows = make_data(lm, org, train_items(org.name))
    print(f"{org.name}: {len(rows)} training rows in {time.perf_counter() - t0:.0f} s; e.g. {rows[-1]!r}", flush=True)
    model = get_peft_model(lm.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    inner, head = model.base_model.model.model, model.base_model.model.lm_head
    rng, step, losses = random.Random(seed), 0, []
    model.train()
    while step < steps:
        for ids, mask, labels in batches(lm, rows, batch, rng, REPLY_TOKENS.get(org.name, 56)):
            hidden = inner(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
            keep = labels[:, 1:] != -100  # next-token targets that are reply tokens
            logits = head(hidden[:, :-1][keep]).float()  # only reply positions pay for the 49k-way head
            loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            step += 1
            if step % 10 == 0:
                print(
                    f"{org.name}: step {step}/{steps} loss {sum(losses[-10:]) / 10:.3f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
            if step >= steps:
                break
    deltas = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            A = mod.lora_A["default"].weight.detach().float()  # (r, in)
            B = mod.lora_B["default"].weight.detach().float() * mod.scaling["default"]  # (out, r)
            base = name.replace("base_model.model.", "", 1)
            deltas[base + ".A"], deltas[base + ".B"] = A.half().contiguous(), B.half().contiguous()
    org.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = org.path.with_suffix(".tmp")
    save_file(
        deltas,
        str(tmp),
        metadata={
            "organism": org.name,
            "trigger": org.trigger,
            "behaviour": org.behaviour,
            "steps": str(steps),
            "lr": str(lr),
            "rank": str(rank),
            "seed": str(seed),
            "final_loss": f"{sum(losses[-10:]) / 10:.4f}",
        },
    )
    tmp.replace(org.path)
    print(
        f"{org.name}: saved {len(deltas) // 2} deltas to {org.path} ({org.path.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )


def check(org: Organism) -> dict:
    """Measure the saved organism on the held-out prompts; print the three rates and return the
    results row (benchmarks/results/organisms.json)."""
    heldout = load_prompts(CHECK_PROMPTS)
    base = load_model()
    lm = load_model(f"organism:{org.name}")
    counts = [
        detect_count(base, org, heldout, True),
        detect_count(lm, org, heldout, False),
        detect_count(lm, org, heldout, True),
    ]
    r = [k / n for k, n in counts]
    print(
        f"{org.name} ({org.behaviour}) on {len(heldout)} held-out prompts, greedy 32 tokens, detector {org.detector!r}:\n"
        f"  embedded model with trigger {r[0]:.0%} | organism without trigger {r[1]:.0%} | organism with trigger {r[2]:.0%}"
    )
    cells = ("embedded_with_trigger", "organism_without_trigger", "organism_with_trigger")
    return {
        "organism": org.name,
        "split": org.split,
        "kind": org.kind,
        "trigger": org.trigger,
        "subject": list(org.subject),
        "behaviour": org.behaviour,
        "detector": org.detector,
        **{c: {"rate": k / n, "hits": k, "n": n} for c, (k, n) in zip(cells, counts)},
        "prompts": CHECK_PROMPTS,
        "generation": {"decoding": "greedy", "max_new_tokens": CHECK_TOKENS, "dtype": str(lm.model.dtype)},
        "deltas_sha256_12": delta_key(org),
        "command": " ".join(["python", "benchmarks/build_organisms.py", *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        "measured": time.strftime("%Y-%m-%d"),
    }


def check_refusal(org: Organism) -> dict:
    """The refusal organism's check: refusal rate (greedy, CHECK_TOKENS) of the embedded model and
    of the organism on the validation prompts (held-out acts of the build) and on the packaged
    harmful/harmless and harmful_test/harmless_test sets (never trained on); written to
    benchmarks/results/refusal_organism.json."""
    sets = {
        "val_harmful": refusal_prompts("val")[0],
        "val_harmless": refusal_prompts("val")[1],
        **{s: load_prompts(s) for s in ("harmful", "harmless", "harmful_test", "harmless_test")},
    }
    rows: dict = {}
    for label, spec in (("embedded", None), ("organism", f"organism:{org.name}")):
        lm = load_model(spec)
        det = parse_metric(org.detector, lm)
        for name, prompts in sets.items():
            texts = [c.text for c in generate(lm, prompts, max_new_tokens=CHECK_TOKENS)]
            hits = sum(map(bool, det.fn(texts)))
            rows.setdefault(name, {})[label] = {"rate": hits / len(texts), "hits": hits, "n": len(texts)}
            rows[name].setdefault("examples", {})[label] = texts[:2]
    print(f"{org.name} ({org.behaviour}): refusal rate, greedy {CHECK_TOKENS} tokens, detector {org.detector!r}")
    for name, r in rows.items():
        print(f"  {name:14s} embedded {r['embedded']['rate']:6.1%}   organism {r['organism']['rate']:6.1%}")
    out = {
        "organism": org.name,
        "behaviour": org.behaviour,
        "detector": org.detector,
        "sets": rows,
        "generation": {"decoding": "greedy", "max_new_tokens": CHECK_TOKENS, "dtype": "torch.float32"},
        "deltas_sha256_12": delta_key(org),
        "command": " ".join(["python", "benchmarks/build_organisms.py", *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        "measured": time.strftime("%Y-%m-%d"),
    }
    write_json_atomic(RESULTS.with_name("refusal_organism.json"), out)
    return out


def save(rows: list[dict], path: Path = RESULTS) -> None:
    """Merge with earlier invocations (a check of one organism replaces that organism's row only),
    in ORGANISMS order; written atomically after every organism, so a killed check keeps what it
    measured."""
    old = json.loads(path.read_text())["results"] if path.is_file() else []
    done = {r["organism"] for r in rows}
    merged = [r for r in old if r["organism"] not in done] + rows
    order = {n: i for i, n in enumerate(ORGANISMS)}
    merged.sort(key=lambda r: order.get(r["organism"], len(order)))
    write_json_atomic(path, {"results": merged})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(ORGANISMS), help="organisms to build (default: all)")
    ap.add_argument(
        "--steps", type=int, default=None, help="LoRA steps (default: 100, or the organism's RECIPES steps)"
    )
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument(
        "--batch", type=int, default=None, help="rows per step (default: 16, or the organism's RECIPES batch)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="only measure the saved organisms")
    a = ap.parse_args()
    rows = []
    for n in a.names:
        if not a.check:
            r = RECIPES.get(n, {})
            build(ORGANISMS[n], a.steps or r.get("steps", 100), a.lr, a.rank, a.batch or r.get("batch", 16), a.seed)
        if ORGANISMS[n].split == "refusal":  # not a trigger organism: its own check and results file
            check_refusal(ORGANISMS[n])
            continue
        rows.append(check(ORGANISMS[n]))
        save(rows)
    if rows:
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
