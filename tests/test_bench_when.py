"""`steerscope bench --when`: the conditional (CAST) stage on a tiny model. With a threshold chosen
from measured gate scores so the gate fires on exactly the on-topic prompts, every vector's gated
completions equal its ungated ones on-topic and the unsteered ones off-topic; the rows reach
results.jsonl and the report; a rerun reuses the stage; bad flags fail at once, exit 2."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tiny_lm, rand_vec
from test_bench import SMALL
from test_when import condition_set

from steerscope.cli import main
from steerscope.directions.vectors import SteeringVector, VectorSet
from steerscope.generation import generate
from steerscope.interventions import Condition
from steerscope.jobs.bench import BenchConfig, bench

CANDIDATES = [
    "Write a short poem about the sea.",
    "How do I fix a flat bicycle tyre?",
    "Describe your favourite holiday.",
    "What is the capital of France?",
    "Give me three tips for a job interview.",
    "Explain how a rainbow forms.",
    "Tell me about your morning.",
    "What should I cook for dinner tonight?",
]


def _topics(lm, c: torch.Tensor, tmp_path):
    """The gate's own scores (chat as the bench encodes), split at the middle: the top half is
    on-topic, the rest off-topic, and the threshold lies between them."""
    probe = generate(
        lm,
        CANDIDATES,
        vectors=[SteeringVector(rand_vec(lm, seed=7), 1, "p")],
        when=Condition(c, 0, -2.0),
        include_unsteered=False,
        max_new_tokens=1,
        progress=False,
    )
    scores = torch.tensor([r.gate_score for r in probe])
    order = scores.argsort(descending=True).tolist()
    k = len(order) // 2
    hi, lo = float(scores[order[k - 1]]), float(scores[order[k]])
    assert hi - lo > 1e-3, "scores too close to split"
    (tmp_path / "on.txt").write_text("\n".join(CANDIDATES[i] for i in order[:k]) + "\n")
    (tmp_path / "off.txt").write_text("\n".join(CANDIDATES[i] for i in order[k:]) + "\n")
    return (hi + lo) / 2


@pytest.fixture(scope="module")
def when_bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bw")
    lm = make_tiny_lm("llama", chat=True)
    c = rand_vec(lm, seed=3)
    thr = _topics(lm, c, tmp)
    # layers 0 and 2: the bench steers at layer 1, so only layer 0 can gate it
    condition_set(lm, torch.stack([c, rand_vec(lm, seed=4)]), [0, 2], [thr, 0.0]).save(tmp / "cond")
    cfg = BenchConfig(
        concepts=["joy"],
        methods=["diffmean", "probe", "prompting"],
        when=str(tmp / "cond"),
        on_topic=str(tmp / "on.txt"),
        off_topic=str(tmp / "off.txt"),
        **SMALL,
    )
    bench(cfg, tmp / "b", lm=lm)
    return lm, cfg, tmp, thr


def test_gate_fires_on_exactly_the_on_topic_set_and_keeps_each_side(when_bench):
    lm, cfg, tmp, thr = when_bench
    res = json.loads((tmp / "b" / "conditional" / "joy.json").read_text())
    assert res["condition"] == {"folder": cfg.when, "layer": 0, "threshold": pytest.approx(thr), "above": True}
    assert set(res["methods"]) == {"diffmean", "probe"}  # prompting has no vector to gate
    concept = json.loads((tmp / "b" / "concepts" / "joy.json").read_text())
    for m, r in res["methods"].items():
        assert r["coef"] == concept["methods"][m]["coef"]  # the matched coefficient bench chose
        n, t, v = r["n_on"], r["texts"], r["values"]
        assert n == 4 and r["fired"] == [True] * 4 + [False] * 4
        assert all((s > thr) == f for s, f in zip(r["scores"], r["fired"]))
        assert t["gated"][:n] == t["ungated"][:n] and t["gated"][n:] == t["unsteered"][n:], m
        assert t["ungated"] != t["unsteered"], f"{m} changed no completion: the equalities above are vacuous"
        assert v["gated.rate_on_topic"] == v["ungated.rate_on_topic"]
        assert v["gated.rate_off_topic"] == v["unsteered.rate_off_topic"]
        assert v["gated.fired_on_topic"] == 1.0 and v["gated.fired_off_topic"] == 0.0
        for x in ("unsteered", "ungated", "gated"):
            assert v[f"{x}.selectivity"] == pytest.approx(v[f"{x}.rate_on_topic"] - v[f"{x}.rate_off_topic"])


def test_rows_reach_results_and_report(when_bench):
    lm, cfg, tmp, thr = when_bench
    rows = [json.loads(l) for l in (tmp / "b" / "results.jsonl").read_text().splitlines()]
    cast = [r for r in rows if r["measure"].startswith("cast_")]
    assert len(cast) == 2 * 11  # 2 methods x (3 variants x 3 measures + 2 firing rates)
    res = json.loads((tmp / "b" / "conditional" / "joy.json").read_text())
    for r in cast:
        assert r["value"] == res["methods"][r["method"]]["values"][f"{r['variant']}.{r['measure'][5:]}"]
        assert r["condition_layer"] == 0 and r["on_topic"] == cfg.on_topic and r["model_fingerprint"]
    fired = {(r["method"], r["measure"]): r for r in cast if r["variant"] == "gated" and "fired" in r["measure"]}
    assert fired["probe", "cast_fired_on_topic"]["value"] == 1.0 and fired["probe", "cast_fired_on_topic"]["n"] == 4
    assert fired["probe", "cast_fired_off_topic"]["split"] == "off_topic"
    assert any(r["measure"] == "score" for r in rows)  # the bench's own rows are still there
    html = (tmp / "b" / "report.html").read_text()
    sec = html[html.index("Conditional steering (CAST)") :]
    sec = sec[: sec.index("<h2>", 4)]
    assert "gate fired" in sec and sec.count("<tr><td>diffmean</td>") == 1 and f"{thr:.3f}" in sec
    v = res["methods"]["probe"]["values"]
    want = [
        v[f"{x}.{m}"]
        for x in ("unsteered", "ungated", "gated")
        for m in ("rate_on_topic", "rate_off_topic", "selectivity")
    ]
    want += [v["gated.fired_on_topic"], v["gated.fired_off_topic"]]
    row = sec[sec.index("<tr><td>probe</td>") :].split("</tr>")[0]
    got = re.findall(r"<td class='num[ a-z]*'>([^<]*)</td>", row)
    assert got[1:] == [f"{x:.2f}" for x in want] and got[-2:] == ["1.00", "0.00"]


def test_a_rerun_reuses_the_stage_and_a_missing_one_is_computed(when_bench, capsys):
    lm, cfg, tmp, _ = when_bench
    art = tmp / "b" / "conditional" / "joy.json"
    stamp, before = art.stat().st_mtime_ns, art.read_text()
    capsys.readouterr()
    bench(cfg, tmp / "b", lm=lm)
    err = capsys.readouterr().err
    assert "when:joy: reused" in err and "when:joy ..." not in err and art.stat().st_mtime_ns == stamp
    art.unlink()
    bench(cfg, tmp / "b", lm=lm)
    err = capsys.readouterr().err
    assert "concept:joy: reused" in err and "when:joy ..." in err
    assert json.loads(art.read_text()) == json.loads(before)  # greedy: the same numbers


def test_bad_inputs_exit_2_before_any_work(when_bench, tmp_path, capsys):
    lm, cfg, tmp, _ = when_bench
    ckpt = tmp_path / "tiny"
    lm.model.save_pretrained(ckpt)
    lm.tokenizer.save_pretrained(ckpt)
    VectorSet.create(lm, rand_vec(lm, seed=7), 1, "random", ids=["v"]).save(tmp_path / "vec")
    capsys.readouterr()
    base = ["bench", "--model", str(ckpt), "--concepts", "joy", "--methods", "diffmean", "--layer", "1"]
    topics = ["--on-topic", str(tmp / "on.txt"), "--off-topic", str(tmp / "off.txt")]
    cond = ["--when", str(tmp / "cond")]
    for i, (extra, words) in enumerate(
        (
            (["--when", str(tmp_path / "nope")] + topics, "--when"),
            (["--when", str(tmp_path / "vec")] + topics, "not a condition set"),
            (cond + ["--on-topic", str(tmp / "on.txt")], "--off-topic"),
            (cond + topics[:2] + ["--off-topic", str(tmp_path / "none.txt")], "--off-topic"),
            (topics, "only apply with --when"),
            (cond + topics + ["--when-layer", "2"], "--when-layer 1 or lower"),
            (cond + topics + ["--when-layer", "1"], "--when-layer"),  # the set has no vector at layer 1
            (cond + topics + ["--methods", "prompting"], "lists none"),
        )
    ):
        out = tmp_path / f"b{i}"
        assert main(base + extra + ["--out", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, (extra, err)
        assert not out.exists(), extra  # nothing written: refused before the first stage
    small = ["--tokens", "8", "--n-neutral", "4", "--max-new-tokens", "8", "--report-instructions", "12"]
    assert main(base + cond + topics + small + ["--dtype", "float32", "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "diffmean  conditional: selectivity gated" in out and "gate fired on 1.00 of on-topic, 0.00 of off" in out
