"""Model-diff amplification (`amplify.Amplify`, `generate(amplify=)`, `steerscope amplify`): the
known answer for one step, alone = batched under left padding, a no-op when the base is the model
itself, and its refusals."""

import json

import pytest
import torch
from conftest import PROMPTS, finetuned, make_tiny_lm, tiny_lm

from steerscope.amplify import Amplify
from steerscope.cli import main
from steerscope.errors import SteerscopeError
from steerscope.generation import generate

KW = dict(max_new_tokens=6, temperature=1.0, chat=False, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_step_is_the_amplified_log_ratio_within_the_top_k(arch):
    base = tiny_lm(arch)
    ft, _ = finetuned(base, seed=3, scale=4.0, blocks=(0, 1))
    enc = ft.encode(PROMPTS, chat=False)  # left-padded, different lengths
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # as generate numbers left-padded rows
    with torch.no_grad():
        scores = ft.model(**enc, position_ids=pos).logits[:, -1].float()
    amp = Amplify(base, alpha=2.0, top_k=5, prompt_mask=enc["attention_mask"])
    got = amp(enc["input_ids"], scores)  # (B, V)
    for i, p in enumerate(PROMPTS):  # each row alone, no padding: the known answer
        e = ft.encode([p], chat=False)
        with torch.no_grad():
            lf = torch.log_softmax(ft.model(**e).logits[0, -1].float(), -1)
            lb = torch.log_softmax(base.model(**e).logits[0, -1].float(), -1)
        want = lf + 2.0 * (lf - lb)
        top = lf.topk(5).indices
        assert torch.isinf(got[i]).sum() == got.shape[-1] - 5 and set(
            torch.isfinite(got[i]).nonzero()[:, 0].tolist()
        ) == set(top.tolist())
        assert torch.allclose(got[i, top], want[top], atol=1e-4), (arch, i)


def test_generate_amplified_alone_equals_batched_and_differs_from_the_fine_tune():
    base = make_tiny_lm("llama")
    ft, _ = finetuned(base, seed=3, scale=6.0, blocks=(0, 1, 2))
    batched = generate(ft, PROMPTS, amplify=Amplify(base, 2.0, 8), seed=5, **KW)
    for i, p in enumerate(PROMPTS):
        alone = generate(ft, PROMPTS[: i + 1], amplify=Amplify(base, 2.0, 8), seed=5, batch_size=1, **KW)[i]
        assert alone.token_ids == batched[i].token_ids, p
    plain = generate(ft, PROMPTS, seed=5, **KW)
    assert any(a.token_ids != b.token_ids for a, b in zip(batched, plain))  # amplification did something
    # the model against itself, every token a candidate: exactly the model's own samples
    same = generate(ft, PROMPTS, amplify=Amplify(ft, 3.0, 10**6), seed=5, **KW)
    assert [r.token_ids for r in same] == [r.token_ids for r in plain]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_amplify_with_the_base_cache_gives_the_tokens_of_full_rereads(arch):
    base = make_tiny_lm(arch)
    ft, _ = finetuned(base, seed=3, scale=6.0, blocks=(0, 1, 2))
    kw = {**KW, "max_new_tokens": 10}
    cached = generate(ft, PROMPTS * 2, amplify=Amplify(base, 2.0, 8), seed=5, batch_size=4, **kw)
    full = generate(ft, PROMPTS * 2, amplify=Amplify(base, 2.0, 8, cache=False), seed=5, batch_size=4, **kw)
    assert [r.token_ids for r in cached] == [r.token_ids for r in full]
    assert max(len(r.token_ids) for r in cached) > 3  # long enough for the cache to be used


def test_amplify_refuses_what_it_cannot_do():
    lm = tiny_lm("llama")
    with pytest.raises(SteerscopeError, match="temperature > 0"):
        generate(lm, PROMPTS, amplify=Amplify(lm), **{**KW, "temperature": 0.0})
    with pytest.raises(SteerscopeError, match="no vectors"):
        generate(lm, PROMPTS, vectors=torch.zeros(1, lm.d_model), layer=0, amplify=Amplify(lm), **KW)
    with pytest.raises(SteerscopeError, match="alpha >= 0"):
        Amplify(lm, alpha=-1.0)


def test_cli_amplify(ckpt, tmp_path, capsys):
    base = make_tiny_lm("llama")  # the same weights as `ckpt`
    ft, _ = finetuned(base, seed=2, scale=4.0, blocks=(1,))
    ft.model.save_pretrained(tmp_path / "ft")
    ft.tokenizer.save_pretrained(tmp_path / "ft")
    args = ["amplify", "--model", str(tmp_path / "ft"), "--no-chat", "--max-new-tokens", "4", "--samples", "2"]
    args += ["--prompt", "Hello there", "--prompt", "Hi"]
    assert main(args + ["--base", str(ckpt), "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert sorted({r["model"] for r in rows}) == ["amplified x2", "base", "fine-tune"] and len(rows) == 12
    assert main(args) == 2  # not an organism: the base must be given
    err = capsys.readouterr().err.strip()
    assert "--base MODEL" in err and "\n" not in err
    assert main(args + ["--base", str(tmp_path)]) == 2  # not a checkpoint
