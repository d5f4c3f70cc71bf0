"""Conditional steering per row (`RowSteering.when`, CAST): a gated row alone = in a batch with
gated, ungated and differently gated rows = joined later in the server's engine (greedy tokens,
cached and uncached); a row whose gate does not fire is bit-identical to an unsteered row; a row
whose gate fires equals the same row steered without a gate. Then the surfaces: `generate(when=)`,
`steerscope generate --when`, the server's `"when"` entry."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from conftest import CORE_ARCHS, make_tiny_lm, rand_vec, tiny_lm
from test_conditional import _greedy, _scores
from test_serve_engine import Collector

from steerscope.cli import main
from steerscope.directions.vectors import SteeringVector, VectorSet
from steerscope.errors import SteerscopeError
from steerscope.generation import generate
from steerscope.interventions import Condition
from steerscope.interventions.positions import ALL
from steerscope.interventions.rows import AddSpec, Gated, RowSteering, per_row
from steerscope.models.hooks import count_hooks
from steerscope.serving.engine import Engine

PROMPTS = ["x", "a b c", "hello there friend", "the quick brown fox jumps over it"]


def condition_set(lm, dirs: torch.Tensor, layers: list[int], thresholds: list[float], **fit) -> VectorSet:
    """A condition set as `steerscope condition` saves it: one vector per layer, its threshold;
    `fit` the fit's recorded settings (chat), when given."""
    hp = {str(l): {"threshold": t, "above": True} for l, t in zip(layers, thresholds)}
    return VectorSet.create(
        lm,
        dirs,
        layers,
        "condition",
        ids=[f"condition-L{l}" for l in layers],
        hyperparams={"condition": hp, "best_layer": layers[0], **({"fit": fit} if fit else {})},
    )


def _split(scores: torch.Tensor) -> float:
    """A threshold between the two middle scores: about half the prompts fire, half do not."""
    s = scores.sort().values
    k = len(s) // 2
    assert s[k] - s[k - 1] > 1e-3, "scores too close to split"
    return float((s[k] + s[k - 1]) / 2)


def _case(lm):
    """Eight rows: gated at layer 0 (fires / does not / fires with above=False), ungated,
    unsteered, gated at layer 1 (fires), one row with an ungated addition and two gates (one fires,
    one does not), one gate of two conditions under "or" (one holds). Returns (prompts, rows,
    expected decisions per row (a tuple per gate), ungated twins, layer-0 scores)."""
    c0, c1 = rand_vec(lm, seed=3), rand_vec(lm, seed=5)
    v1, v2 = rand_vec(lm, seed=7, scale=12.0), rand_vec(lm, seed=9, scale=12.0)
    s0 = {p: float(_scores(lm, [p], c0, 0)[0]) for p in PROMPTS}
    s1 = {p: float(_scores(lm, [p], c1, 1)[0]) for p in PROMPTS}
    add1, add2 = (AddSpec(v1, 1, 1.0, ALL),), (AddSpec(v2, 2, 1.0, ALL),)
    add3 = (AddSpec(v2, 1, -0.5, ALL),)
    spec = [  # (prompt, adds, when, fires)
        (PROMPTS[2], add1, Condition(c0, 0, s0[PROMPTS[2]] - 0.05), True),
        (PROMPTS[1], add1, Condition(c0, 0, s0[PROMPTS[1]] + 0.05), False),
        (PROMPTS[3], add2, None, None),
        (PROMPTS[0], (), None, None),
        (PROMPTS[3], add2, Condition(c1, 1, s1[PROMPTS[3]] - 0.05), True),
        (PROMPTS[0], add1, Condition(c0, 0, s0[PROMPTS[0]] + 0.05, above=False), True),
    ]
    prompts = [p for p, *_ in spec]
    rows = [RowSteering(adds=a, when=w) for _, a, w, _ in spec]
    fires = [() if f is None else (f,) for *_, f in spec]
    twins = [RowSteering(adds=a) if f or f is None else RowSteering() for _, a, _, f in spec]
    # Several gates on one row: two `Gated` groups at the same condition site (two slots of one
    # kind) beside an ungated addition; then one gate holding two conditions under "or".
    p = PROMPTS[2]
    two = (
        Gated(add1, (Condition(c0, 0, s0[p] - 0.05),)),
        Gated(add3, (Condition(c0, 0, s0[p] + 0.05),)),
    )
    either = Gated(add2, (Condition(c0, 0, s0[PROMPTS[3]] + 0.05), Condition(c1, 1, s1[PROMPTS[3]] - 0.05)), "or")
    prompts += [p, PROMPTS[3]]
    rows += [RowSteering(adds=add2, gated=two), RowSteering(gated=(either,))]
    fires += [(True, False), (True,)]
    twins += [RowSteering(adds=add2 + add1), RowSteering(adds=add2)]
    return prompts, rows, fires, twins, {PROMPTS[i]: s0[PROMPTS[i]] for i in range(4)}


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_gated_rows_alone_equal_batched_and_their_ungated_twin(arch, use_cache):
    lm = tiny_lm(arch)
    prompts, rows, fires, twins, _ = _case(lm)
    batch = per_row(rows, lm.d_model)
    hooks = count_hooks(lm.model)  # the shared tiny model may carry other tests' transformers hooks
    got = _greedy(lm, prompts, [batch], use_cache)
    assert [tuple(g.fired for g in gs) for gs in batch.gates(len(rows))] == fires
    assert count_hooks(lm.model) == hooks
    for i, p in enumerate(prompts):
        where = f"{arch} cache={use_cache} row {i}"
        alone_iv = per_row([rows[i]], lm.d_model)
        alone = _greedy(lm, [p], [alone_iv], use_cache)
        twin = _greedy(lm, [p], [per_row([twins[i]], lm.d_model)], use_cache)
        # a fired row = its ungated twin; an unfired one = the unsteered model, bit for bit
        assert alone[0].tolist() == twin[0].tolist(), where + ": alone differs from its ungated twin"
        if fires[i] and not any(fires[i]):
            assert torch.equal(alone[1], twin[1]), where + ": an unfired gate changed the row"
        else:
            assert (alone[1] - twin[1]).abs().max() < 1e-5, where
        assert tuple(g.fired for g in alone_iv.gates(1)[0]) == fires[i]
        assert got[0][i].tolist() == alone[0][0].tolist(), where + ": batched tokens differ from alone"
        assert (got[1][i] - alone[1][0]).abs().max() < 1e-4, where + ": batched logits differ from alone"
    # the steering did something (a silent no-op would pass the equalities above)
    none = _greedy(lm, prompts, [], use_cache)
    assert any(got[0][i].tolist() != none[0][i].tolist() for i in range(len(rows)) if any(fires[i]))
    # the "or" gate's scores: one per condition, the first also as `score`
    g = batch.gates(len(rows))[-1][0]
    assert len(g.scores) == 2 and g.score == g.scores[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unfired_row_is_bit_identical_in_a_batch(arch):
    """In the same batch, a gated row that does not fire gives exactly what the row gives with no
    steering at all (the other rows unchanged)."""
    lm = tiny_lm(arch)
    prompts, rows, fires, _, _ = _case(lm)
    i = fires.index((False,))
    a = _greedy(lm, prompts, [per_row(rows, lm.d_model)])
    b = _greedy(lm, prompts, [per_row(rows[:i] + [RowSteering()] + rows[i + 1 :], lm.d_model)])
    assert torch.equal(a[1][i], b[1][i]) and a[0][i].tolist() == b[0][i].tolist()


def test_latched_rows_and_bad_gates():
    lm = tiny_lm("llama")
    _, rows, _, _, _ = _case(lm)
    with pytest.raises(SteerscopeError, match="latched"):
        per_row(rows, lm.d_model, latched=[None] * len(rows))
    with pytest.raises(SteerscopeError, match="not decided"):
        per_row(rows, lm.d_model).gates(len(rows))
    wide = Condition(rand_vec(lm, rows=2), 0, 0.0)
    with pytest.raises(SteerscopeError, match="row 0"):
        per_row([RowSteering(adds=rows[0].adds, when=wide)], lm.d_model)
    # a gate holding no addition is no gate: nothing decided, reported or latched for it
    empty = RowSteering(when=rows[0].when, gated=(Gated((), (rows[0].when,)),))
    assert empty.gates() == [] and len(per_row([empty], lm.d_model)) == 0
    assert len(per_row([empty, rows[0]], lm.d_model, latched=[(), (True,)])) == 1


# ---- generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generate_when_gates_each_prompt(use_cache):
    lm = tiny_lm("qwen2")
    c, vec = rand_vec(lm, seed=3), rand_vec(lm, seed=7, scale=12.0)
    scores = _scores(lm, PROMPTS, c, 0)  # chat=False below: the same tokens as these scores
    thr = _split(scores)
    kw = dict(vectors=[SteeringVector(vec, 1, "v")], chat=False, max_new_tokens=8, use_cache=use_cache)
    gated = generate(lm, PROMPTS, when=Condition(c, 0, thr), **kw)
    plain = generate(lm, PROMPTS, **kw)
    base, steered = plain[: len(PROMPTS)], plain[len(PROMPTS) :]
    assert [r.gate_fired for r in gated[: len(PROMPTS)]] == [None] * len(PROMPTS)  # the unsteered rows
    for r, s, b, sc in zip(gated[len(PROMPTS) :], steered, base, scores.tolist()):
        assert r.gate_fired == (sc > thr) and abs(r.gate_score - sc) < 1e-4
        assert r.token_ids == (s.token_ids if r.gate_fired else b.token_ids), r.prompt
    assert any(s.token_ids != b.token_ids for s, b in zip(steered, base))
    with pytest.raises(SteerscopeError, match="condition layer <= 1"):
        generate(lm, PROMPTS, when=Condition(c, 2, thr), **kw)


# ---- the server's engine: rows join a running batch -------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_engine_gated_rows_joining_equal_generate(use_cache):
    lm = make_tiny_lm("llama")
    prompts, rows, fires, twins, _ = _case(lm)
    refs = [generate(lm, [p], chat=False, max_new_tokens=10, progress=False)[0].token_ids for p in prompts]
    for i, (p, r) in enumerate(zip(prompts, rows)):  # each row alone through `generate`'s per-row path
        if r.adds and not r.gated:
            out = generate(
                lm,
                [p],
                vectors=[SteeringVector(r.adds[0].vector, r.adds[0].layer, "v")],
                when=r.when,
                chat=False,
                max_new_tokens=10,
                include_unsteered=False,
            )[0]
            refs[i] = out.token_ids
            assert ((out.gate_fired,) if r.when is not None else ()) == fires[i]
    waves = (0, 1, 6, 2, 3, 7, 4, 5, 0, 6, 5, 1)
    eng = Engine(lm, max_batch=8, window_s=0.0, use_cache=use_cache).start()
    try:
        for i in (6, 7):  # several gates on a row: its ungated twin, alone in the engine
            col = Collector(eng)
            col.submit(lm, prompts[i], twins[i], max_tokens=10)
            col.wait(1)
            refs[i] = col.tokens(0)
        col = Collector(eng)
        for k in waves:  # waves: later requests join rows already decoding
            col.submit(lm, prompts[k], rows[k], max_tokens=10)
            if k % 2 == 0:
                time.sleep(0.01)
        col.wait(len(waves))
    finally:
        eng.stop()
    for j, k in enumerate(waves):
        assert col.tokens(j) == refs[k], f"request {j} (row {k}) differs from generate alone"
        assert tuple(g["fired"] for g in col.finish(j).gates) == fires[k]
    assert eng.stats["prefills"] > 1 and eng.stats["errors"] == 0 and count_hooks(lm.model) == 0


# ---- the CLI -----------------------------------------------------------------------------------
def test_cli_generate_when(tmp_path, capsys):
    lm = make_tiny_lm("llama")
    ckpt = tmp_path / "tiny"
    lm.model.save_pretrained(ckpt)
    lm.tokenizer.save_pretrained(ckpt)
    c = rand_vec(lm, seed=3)
    ps = PROMPTS[1:3]
    scores = _scores(lm, ps, c, 0)
    condition_set(lm, torch.stack([c, rand_vec(lm, seed=4)]), [0, 1], [_split(scores), 0.0]).save(tmp_path / "cond")
    VectorSet.create(lm, rand_vec(lm, seed=7, scale=12.0), 1, "random", ids=["v"]).save(tmp_path / "vec")
    condition_set(lm, torch.stack([c, c]), [0, 1], [0.0, 0.0], chat=True).save(tmp_path / "chatcond")
    base = ["generate", "--model", str(ckpt), "--vector", str(tmp_path / "vec"), "--no-chat", "--max-new-tokens", "4"]
    base += [a for p in ps for a in ("--prompt", p)]
    assert main(base + ["--when", str(tmp_path / "cond"), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steered = [o for o in out if o["vector_id"] == "v"]
    assert [o["gate_fired"] for o in steered] == (scores > _split(scores)).tolist()  # one fires, one does not
    assert abs(steered[0]["gate_score"] - float(scores[0])) < 1e-4
    assert main(base + ["--when", str(tmp_path / "cond"), "--when-threshold", "-1"]) == 0
    assert capsys.readouterr().out.count("gate: fired (score") == 2
    for extra, words in (
        (["--when", str(tmp_path / "nope")], "--when"),
        (["--when", str(tmp_path / "vec")], "not a condition set"),
        (["--when", str(tmp_path / "cond"), "--when-layer", "2"], "--when-layer"),
        (["--when-layer", "0"], "need --when"),
        (["--when", str(tmp_path / "chatcond")], "fitted on prompts with the chat template"),  # --no-chat here
    ):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err


# ---- the HTTP server ---------------------------------------------------------------------------
def test_server_when_entry(tmp_path):
    from steerscope.serving.app import Server
    from steerscope.serving.config import ServeConfig

    lm = make_tiny_lm("llama")
    c, vec = rand_vec(lm, seed=3), rand_vec(lm, seed=7, scale=6.0)
    ps = PROMPTS[1:3]
    scores = _scores(lm, ps, c, 0)
    thr = _split(scores)
    with Server(lm, ServeConfig(port=0)) as s:
        s.store.add("cond", condition_set(lm, torch.stack([c, rand_vec(lm, seed=4)]), [0, 2], [thr, 0.0]))
        s.store.add("v", VectorSet.create(lm, vec, 1, "random", ids=["v"]))
        url = s.url + "/v1/completions"

        def ask(prompt, steering, stream=False):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "steering": steering, "stream": stream}
            return httpx.post(url, json=body, timeout=60)

        when = {"vector": "v", "when": {"condition": "cond"}}
        for p, sc in zip(ps, scores.tolist()):
            r = ask(p, [when])
            assert r.status_code == 200, r.text
            g = r.json()["steerscope"]["when"]
            assert g["fired"] == (sc > thr) and abs(g["score"] - sc) < 1e-4
            ref = ask(p, [{"vector": "v"}] if g["fired"] else [])
            assert r.json()["steerscope"]["token_ids"] == ref.json()["steerscope"]["token_ids"]
            assert "when" not in ref.json()["steerscope"]
            lines = [json.loads(x[6:]) for x in ask(p, [when], stream=True).text.splitlines() if x[6:7] == "{"]
            assert [x["steerscope"]["when"] for x in lines if "when" in x.get("steerscope", {})] == [g]
        r = ask(ps[0], [{"vector": "v", "when": {"condition": "cond", "threshold": -1.0, "above": True}}])
        assert r.json()["steerscope"]["when"]["fired"] is True
        bad = [
            ({"condition": "zzz"}, "steering[0].when.condition", "unknown condition set"),
            ({"condition": "v"}, "steering[0].when.condition", "not a condition set"),
            ({"condition": "cond", "layer": 1}, "steering[0].when.layer", "no condition vector at layer 1"),
            ({"condition": "cond", "layer": 2}, "steering[0].when.layer", "condition layer <= 1"),
            ({"condition": "cond", "threshold": "0.1"}, "steering[0].when.threshold", "valid number"),
            ({"condition": "cond", "if": 1}, "steering[0].when.if", "not supported"),
        ]
        for w, param, words in bad:
            r = ask(ps[0], [{"vector": "v", "when": w}])
            assert r.status_code == 400, (w, r.text)
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], (w, err)
        # several gates in one request: a gated entry beside an ungated one; two entries behind
        # two different gates (one always holds); the same gate written two ways is one gate
        always = {"vector": "v", "coef": 0.5, "when": {"condition": "cond", "threshold": -1.0, "above": True}}
        same = {"vector": "v", "coef": 0.5, "when": {"condition": "cond", "layer": 0, "threshold": thr, "above": True}}
        for p, sc in zip(ps, scores.tolist()):
            fired = sc > thr
            r = ask(p, [when, {"vector": "v"}])
            assert r.status_code == 200, r.text
            assert r.json()["steerscope"]["when"] == {
                "steering": [0],
                "fired": fired,
                "score": pytest.approx(sc, abs=1e-4),
            }
            ref = ask(p, [{"vector": "v"}] * (2 if fired else 1))
            assert r.json()["steerscope"]["token_ids"] == ref.json()["steerscope"]["token_ids"], p
            r = ask(p, [when, always])
            got = r.json()["steerscope"]["when"]
            assert [(g["steering"], g["fired"]) for g in got] == [([0], fired), ([1], True)], got
            ref = ask(p, ([{"vector": "v"}] if fired else []) + [{"vector": "v", "coef": 0.5}])
            assert r.json()["steerscope"]["token_ids"] == ref.json()["steerscope"]["token_ids"], p
            got = ask(p, [when, same]).json()["steerscope"]["when"]
            assert got["steering"] == [0, 1] and got["fired"] == fired
            # several conditions in one gate: "all" holds only where the prompt's own gate fires,
            # "any" (with an always-true condition) everywhere
            never = {"condition": "cond", "threshold": 2.0}
            anyw = {"vector": "v", "when": {"any": [never, {"condition": "cond", "threshold": -1.0}]}}
            allw = {"vector": "v", "when": {"all": [{"condition": "cond"}, {"condition": "cond", "threshold": -1.0}]}}
            for w, want in ((anyw, True), (allw, fired)):
                r = ask(p, [w])
                g = r.json()["steerscope"]["when"]
                assert r.status_code == 200 and g["fired"] == want and g["steering"] == [0], r.text
                ref = ask(p, [{"vector": "v"}] if want else [])
                assert r.json()["steerscope"]["token_ids"] == ref.json()["steerscope"]["token_ids"], p
        for w, param in (
            ({"all": [{"condition": "cond"}], "condition": "cond"}, "steering[0].when"),
            ({"any": []}, "steering[0].when.any"),
            ({"any": [{"all": [{"condition": "cond"}]}]}, "steering[0].when.any[0]"),
            ({"all": [{"condition": "cond"}], "threshold": 0.1}, "steering[0].when.threshold"),
            ({"all": [{"condition": "cond", "layer": 1}]}, "steering[0].when.all[0].layer"),
        ):
            r = ask(ps[0], [{"vector": "v", "when": w}])
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (w, r.text)
        # a set fitted with the chat template gates raw /v1/completions prompts wrongly: refused
        s.store.add("chatcond", condition_set(lm, torch.stack([c, c]), [0, 2], [thr, 0.0], chat=True))
        r = ask(ps[0], [{"vector": "v", "when": {"condition": "chatcond"}}])
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "steering[0].when.condition", r.text
        assert "fitted on prompts with the chat template" in err["message"] and "/v1/chat/completions" in err["message"]
        r = ask(ps[0], [{"ablate": "v", "when": {"condition": "cond"}}])
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering[0].when"
        # an ablation beside a gated addition: the ablation applies ungated (so the gate reads the
        # ablated residual stream), the addition only when the gate fires
        for p in ps:
            r = ask(p, [{"ablate": "v"}, when])
            assert r.status_code == 200, r.text
            g = r.json()["steerscope"]["when"]
            fired = g["fired"]
            assert fired == (g["score"] > thr)
            ref = ask(p, [{"ablate": "v"}] + ([{"vector": "v"}] if fired else []))
            assert r.json()["steerscope"]["token_ids"] == ref.json()["steerscope"]["token_ids"], p
    assert count_hooks(lm.model) == 0


# ---- bench: the conditional row --------------------------------------------------------------
def test_bench_conditional_rows_report_selectivity():
    from steerscope.jobs.bench_when import conditional_rows, conditional_table

    lm = tiny_lm("llama")
    c, vec = rand_vec(lm, seed=3), rand_vec(lm, seed=7, scale=12.0)
    scores = _scores(lm, PROMPTS, c, 0)
    thr = _split(scores)
    on = [p for p, s in zip(PROMPTS, scores.tolist()) if s > thr]
    off = [p for p, s in zip(PROMPTS, scores.tolist()) if s <= thr]
    base = [r.text for r in generate(lm, on + off, max_new_tokens=8, chat=False)]
    sv = SteeringVector(vec, 1, "v")
    steered = [r.text for r in generate(lm, on + off, vectors=[sv], include_unsteered=False, max_new_tokens=8)]
    assert all(s != b for s, b in zip(steered, base)), "the vector must change every prompt (else vacuous)"

    def shows(texts):  # "shows the behaviour" = differs from the unsteered completion of its prompt
        return [t != b for t, b in zip(texts, base)]

    rows = conditional_rows(lm, sv, 1.0, Condition(c, 0, thr), on, off, shows, max_new_tokens=8, chat=False)
    val = {(r["method"], r["measure"]): r["value"] for r in rows}
    assert val["unsteered", "rate_on_topic"] == val["unsteered", "rate_off_topic"] == 0
    assert val["ungated", "rate_on_topic"] == val["ungated", "rate_off_topic"] == 1
    assert val["ungated", "selectivity"] == 0 and val["gated", "selectivity"] == 1
    assert val["gated", "fired_on_topic"] == 1 and val["gated", "fired_off_topic"] == 0
    table = conditional_table(rows)
    assert table.splitlines()[3].split() == ["gated", "1.00", "0.00", "1.00", "1.00", "0.00"]
