"""`steerscope bench --when` on SmolLM2 for the issue's own example: answer in French only when asked
about France (issue 34; CAST, Lee et al., ICLR 2025).

    python benchmarks/cast_france.py --target T    # ~2 min on 2 CPU cores, float32; T in 0.5, 2, 4 (README)

1. `steerscope condition` on FIT_ON (questions about France) vs FIT_OFF (the same kinds of question
   about other countries, and about nothing in particular), at the layers at or before the bench's
   steering layer (40 % depth: 12 of SmolLM2-135M's 30), its own 70/30 validation split.
2. `steerscope bench --when` with the shipped concept `french`, method diffmean only, gated on that
   condition, measured on ON_TOPIC vs OFF_TOPIC: other prompts than the fit's (asserted below),
   same two kinds. Each set is small (24 each), so a rate moves by ~4 points per prompt. --target is
   the bench's KL budget: at its default 0.5 the ungated vector barely turned the other questions
   French (4 %), so the gate had little to remove; 2 and 4 were run after seeing that, to show the
   gate where the vector leaks (nothing was tuned on the table: the condition and prompts are fixed).

Writes the prompt files and both runs under --out (default runs/cast-france) and the conditional
table with the commands and wall times to benchmarks/results/cast_france_kl{TARGET}.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._env import machine, versions  # noqa: E402
from steerscope._io import refuse_existing, write_json_atomic, write_text_atomic  # noqa: E402
from steerscope.cli import main as cli  # noqa: E402
from steerscope.jobs.bench_when import conditional_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

FIT_ON = [
    "What is the capital of France?",
    "Tell me about the history of France.",
    "What food is France famous for?",
    "What are the best places to visit in Paris?",
    "Who was Napoleon Bonaparte?",
    "What is the population of France?",
    "How do people in France celebrate Bastille Day?",
    "What wine regions are there in France?",
    "Describe the French Riviera.",
    "What is the Eiffel Tower made of?",
    "Which rivers flow through France?",
    "What is the French education system like?",
    "Tell me about the French Revolution.",
    "What currency does France use?",
    "How big is France compared to other European countries?",
    "What are the Alps like on the French side?",
    "Which French cheeses should I try?",
    "What is life like in Lyon?",
    "Tell me about the Louvre museum in Paris.",
    "Who is the president of France?",
    "What is the climate like in the south of France?",
    "How do I travel by train around France?",
    "What are some famous French painters?",
    "Explain the French political system.",
    "What is Normandy known for?",
    "Tell me about the Tour de France.",
    "What traditions do French families have at Christmas?",
    "What are the main industries in France?",
    "Describe a typical breakfast in France.",
    "What happened in France during the Second World War?",
    "Which islands belong to France?",
    "What is Marseille like as a city?",
]
FIT_OFF = [
    "What is the capital of Japan?",
    "Tell me about the history of Germany.",
    "What food is Italy famous for?",
    "What are the best places to visit in London?",
    "Who was Genghis Khan?",
    "What is the population of Brazil?",
    "How do people in the United States celebrate Independence Day?",
    "What wine regions are there in Australia?",
    "Describe the coast of California.",
    "What is the Statue of Liberty made of?",
    "Which rivers flow through Egypt?",
    "What is the education system in Finland like?",
    "Tell me about the Industrial Revolution in Britain.",
    "What currency does Japan use?",
    "How do I bake a loaf of bread?",
    "What is a black hole?",
    "How do I change a flat tyre?",
    "Give me tips for a job interview.",
    "How does photosynthesis work?",
    "What should I feed a new puppy?",
    "Explain how a computer stores data.",
    "Write a short poem about autumn.",
    "How can I save money on groceries?",
    "What are the rules of basketball?",
    "How do vaccines work?",
    "Recommend a good exercise routine for beginners.",
    "What is the tallest mountain in the world?",
    "How do I learn to play the guitar?",
    "Why is the sky blue?",
    "What are the planets in our solar system?",
    "How do I write a good résumé?",
    "What causes earthquakes?",
]
ON_TOPIC = [
    "What is the weather like in Paris in spring?",
    "Tell me about the castles of the Loire Valley in France.",
    "What should I eat on a trip to France?",
    "Who was Joan of Arc?",
    "How do French people greet each other?",
    "What is Mont Saint-Michel?",
    "Describe the city of Bordeaux.",
    "What are the most popular sports in France?",
    "Tell me about the region of Provence.",
    "What language do people speak in France?",
    "How did France become a republic?",
    "What is the French national anthem about?",
    "What is the Palace of Versailles?",
    "Recommend a road trip through the French countryside.",
    "What are French bakeries like?",
    "How do I rent an apartment in Paris?",
    "What is the history of Notre-Dame de Paris?",
    "Which famous writers came from France?",
    "What is Corsica like?",
    "How many regions does France have?",
    "What do French students eat for lunch at school?",
    "Tell me about the Pyrenees mountains on the border of France.",
    "What is the best time of year to visit France?",
    "How expensive is it to live in France?",
]
OFF_TOPIC = [
    "What is the weather like in Rome in spring?",
    "Tell me about the castles of Scotland.",
    "What should I eat on a trip to Mexico?",
    "Who was Cleopatra?",
    "How do people in Japan greet each other?",
    "What is Machu Picchu?",
    "Describe the city of Barcelona.",
    "What are the most popular sports in India?",
    "Tell me about the region of Tuscany.",
    "What language do people speak in Brazil?",
    "How do I make a cup of green tea?",
    "What is the difference between a virus and a bacterium?",
    "How do airplanes stay in the air?",
    "Recommend a good book for a long flight.",
    "How do I keep my houseplants alive?",
    "What is the best way to learn a new language?",
    "Explain how a bicycle gear system works.",
    "Write a short story about a lost cat.",
    "How do I organise my weekly schedule?",
    "What is the speed of light?",
    "How do bees make honey?",
    "What are good habits for better sleep?",
    "How do I start running as a beginner?",
    "What is the history of the internet?",
]
BENCH_FLAGS = [
    # the fewest arms that still give a conditional row: one concept, one method, the matched
    # coefficient only (curve 1, A/B at 0), few instructions and neutral rollouts
    "--concepts", "french",
    "--methods", "diffmean",
    "--dtype", "float32",
    "--report-instructions", "9",
    "--curve", "1.0",
    "--ab-multipliers", "0.0",
    "--n-neutral", "8",
    "--max-new-tokens", "32",
    "--n-topic", "24",
]  # fmt: skip


def run(argv: list[str]) -> tuple[float, str]:
    """`steerscope ARGV` in this process: its wall time and what it printed (also echoed)."""
    print("$ steerscope " + " ".join(argv), flush=True)
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli(argv)
    wall = time.perf_counter() - t0
    print(buf.getvalue(), flush=True)
    if rc != 0:
        sys.exit(f"steerscope {argv[0]} exited {rc}")
    return wall, buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/cast-france", help="folder for the prompts, the condition and the bench")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--target", type=float, default=0.5, help="bench's per-token KL budget (its default 0.5)")
    a = ap.parse_args()
    result = RESULTS / f"cast_france_kl{a.target:g}.json"
    fit, test = set(FIT_ON + FIT_OFF), set(ON_TOPIC + OFF_TOPIC)
    assert not fit & test, "the bench's on/off-topic prompts must stay apart from the condition's fit"
    refuse_existing(a.out, a.force)
    out = Path(a.out)
    files = {}
    for name, lines in (("fit_on", FIT_ON), ("fit_off", FIT_OFF), ("on_topic", ON_TOPIC), ("off_topic", OFF_TOPIC)):
        files[name] = out / "prompts" / f"{name}.txt"
        files[name].parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(files[name], "\n".join(lines) + "\n")
    cond = ["condition", "--sets", str(files["fit_on"]), str(files["fit_off"]), "--out", str(out / "condition")]
    cond += ["--layers", "0:13", "--dtype", "float32", *(["--force"] if a.force else [])]
    wall_cond, _ = run(cond)
    bench = ["bench", "--when", str(out / "condition"), "--on-topic", str(files["on_topic"])]
    bench += ["--off-topic", str(files["off_topic"]), *BENCH_FLAGS, "--target", f"{a.target:g}"]
    bench += ["--out", str(out / f"bench-kl{a.target:g}")]
    wall_bench, _ = run(bench + (["--force"] if a.force else []))
    res = json.loads((out / f"bench-kl{a.target:g}" / "conditional" / "french.json").read_text())
    rows = res["methods"]["diffmean"]
    val = rows["values"]
    table = conditional_table(
        [{"method": k.split(".")[0], "measure": k.split(".", 1)[1], "value": v} for k, v in val.items()]
    )
    print(table)
    n_on = rows["n_on"]
    write_json_atomic(
        result,
        {
            "model": "default (SmolLM2-135M-Instruct)",
            "commands": {"condition": "steerscope " + " ".join(cond), "bench": "steerscope " + " ".join(bench)},
            "wall_s": {"condition": round(wall_cond, 1), "bench": round(wall_bench, 1)},
            "condition": res["condition"],
            "behaviour": {"concept": "french", "method": "diffmean", "layer": rows["layer"], "coef": rows["coef"]},
            "n": {"on_topic": res["on_topic"]["n"], "off_topic": res["off_topic"]["n"]},
            "values": val,
            "table": table,
            "examples": [
                {v: rows["texts"][v][i] for v in ("unsteered", "ungated", "gated")} | {"prompt": p}
                for i, p in ((0, ON_TOPIC[0]), (n_on, OFF_TOPIC[0]))
            ],
            "machine": machine(),
            "versions": versions(),
            "measured": time.strftime("%Y-%m-%d"),
        },
    )
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
