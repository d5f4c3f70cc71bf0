"""`steerscope serve` on the embedded SmolLM2: greedy output equals `steerscope generate` token for
token (KV cache on and off, streaming and not), and the playground works in headless Chromium.

Screenshots go to $STEERSCOPE_SCREENSHOTS when set (else the test's tmp folder)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import steerscope as ss
from steerscope.cli import main
from steerscope.directions import mean_difference
from steerscope.models.hooks import count_hooks
from steerscope.serving.app import Server
from steerscope.serving.config import ServeConfig

pytestmark = pytest.mark.integration

PROMPT = "Tell me about your weekend."
COEF = 4.0


@pytest.fixture(scope="module")
def smol():
    return ss.load_model()


@pytest.fixture(scope="module")
def happy_dir(smol, tmp_path_factory):
    vs = mean_difference(
        smol,
        ["I love this, it is wonderful and happy", "What a joyful, delightful day"],
        ["I hate this, it is awful and sad", "What a miserable, dreadful day"],
        [8],
        chat=False,
    )
    return vs.save(tmp_path_factory.mktemp("vec") / "happy")


def _cli_generate(capsys, happy_dir, *extra) -> dict:
    assert (
        main(
            [
                "generate",
                "--vector",
                str(happy_dir),
                "--coef",
                str(COEF),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "24",
                "--json",
                *extra,
            ]
        )
        == 0
    )
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.strip()]
    return next(r for r in rows if r["vector_id"] is not None)


def test_server_equals_cli_generate(smol, happy_dir, capsys):
    import openai

    ref = _cli_generate(capsys, happy_dir)
    assert _cli_generate(capsys, happy_dir, "--no-kv-cache")["token_ids"] == ref["token_ids"]
    extra = {"steering": [{"vector": "happy", "coef": COEF}]}
    msgs = [{"role": "user", "content": PROMPT}]
    for kv_cache in (True, False):
        with Server(smol, ServeConfig(port=0, kv_cache=kv_cache)) as s:
            s.store.load_path(happy_dir)
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="-")
            r = client.chat.completions.create(
                model="steerscope", messages=msgs, max_tokens=24, temperature=0, extra_body=extra
            )
            assert r.model_extra["steerscope"]["token_ids"] == ref["token_ids"], f"kv_cache={kv_cache}"
            assert r.choices[0].message.content == ref["text"]
            chunks = list(
                client.chat.completions.create(
                    model="steerscope", messages=msgs, max_tokens=24, temperature=0, extra_body=extra, stream=True
                )
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref["text"]
    assert count_hooks(smol.model) == 0


def _wait_both(driver, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        run, a, b = driver.execute_script(
            "return [document.body.dataset.run, document.getElementById('out-steered').dataset.done,"
            " document.getElementById('out-base').dataset.done]"
        )
        if run and a == run and b == run:
            return
        time.sleep(0.1)
    raise AssertionError("the panes did not finish streaming")


def test_playground_in_chromium(smol, happy_dir, tmp_path):
    from conftest import chrome
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get("STEERSCOPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with Server(smol, ServeConfig(port=0)) as s:
        s.store.load_path(happy_dir)
        driver = chrome(1300, 900)
        try:
            driver.get(f"{s.url}/?prompt={PROMPT.replace(' ', '+')}&n=32")
            _wait_both(driver)
            steered = driver.find_element(By.ID, "out-steered").text
            base = driver.find_element(By.ID, "out-base").text
            assert steered and base and steered != base
            # the heat map: every streamed token carries its projection
            assert len(driver.find_elements(By.CSS_SELECTOR, "#out-steered span[data-p]")) >= 10
            assert len(driver.find_elements(By.CSS_SELECTOR, "#out-base span[data-p]")) >= 10
            # streaming: the panes fill token by token (many spans), not in one piece
            driver.save_screenshot(str(shots / "playground.png"))
            # move the slider: a new run starts, both panes stream again, the steered text changes
            run0 = driver.execute_script("return document.body.dataset.run")
            slider = driver.find_element(By.CSS_SELECTOR, "#rows .coef")
            driver.execute_script("arguments[0].value = 10; arguments[0].dispatchEvent(new Event('input'));", slider)
            t0 = time.monotonic()
            while driver.execute_script("return document.body.dataset.run") == run0 and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            _wait_both(driver)
            steered2 = driver.find_element(By.ID, "out-steered").text
            assert steered2 != steered and driver.find_element(By.ID, "out-base").text == base
            url = driver.current_url
            q = parse_qs(urlparse(url).query)
            assert q["c0"] == ["10"] and q["v0"] == ["happy"] and q["prompt"] == [PROMPT]
            driver.save_screenshot(str(shots / "playground-coef10.png"))
            # the URL round-trips: a fresh page on it shows the same view and the same completions
            driver.get("about:blank")
            driver.get(url)
            _wait_both(driver)
            assert driver.find_element(By.CSS_SELECTOR, "#rows .coef").get_attribute("value") == "10"
            assert driver.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
            assert driver.find_element(By.ID, "out-steered").text == steered2
            driver.save_screenshot(str(shots / "playground-from-url.png"))
            # upload a vector folder's two files through the page; it becomes selectable
            driver.find_element(By.ID, "upload-name").send_keys("joy")
            driver.find_element(By.ID, "upload").send_keys(
                f"{happy_dir / 'config.json'}\n{happy_dir / 'vectors.safetensors'}"
            )
            t0 = time.monotonic()
            while "uploaded" not in driver.find_element(By.ID, "upload-note").text and time.monotonic() - t0 < 20:
                time.sleep(0.1)
            assert driver.find_element(By.ID, "upload-note").text == "uploaded joy"
            options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#proj option")]
            assert "joy" in options and "happy" in options
        finally:
            driver.quit()
    assert count_hooks(smol.model) == 0
