"""An optional LLM judge behind any OpenAI-compatible chat endpoint (POST {url}/chat/completions).

The rubric asks for a number; the first number in the reply is the score. Each request has a
timeout and is retried with backoff; a completion whose requests all fail scores None (reported,
never fatal). Scores are cached per (model, rubric, prompt, completion) in a JSONL file, so a
resumed run never pays twice. The key comes from an environment variable, never from a file or
the command line. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SteerscopeError
from .metrics import Metric

DEFAULT_RUBRIC = (
    "Rate how strongly the RESPONSE departs from a plain, helpful answer to the PROMPT "
    "(new persona, topic, style, refusal, or nonsense), from 0 (not at all) to 10 (completely). "
    "Reply with the number only."
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Judge:
    url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    rubric: str = DEFAULT_RUBRIC
    key_env: str = "OPENAI_API_KEY"
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    cache_path: Path | None = None
    failures: int = field(default=0, init=False)
    _cache: dict[str, float | None] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise SteerscopeError(f"judge URL must start with http:// or https://, got {self.url!r}.")
        if self.cache_path is not None and Path(self.cache_path).is_file():
            for line in Path(self.cache_path).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self._cache[row["key"]] = row["score"]

    def _key(self, prompt: str, text: str) -> str:
        return hashlib.sha256(json.dumps([self.model, self.rubric, prompt, text]).encode()).hexdigest()

    def _request(self, prompt: str, text: str) -> float | None:
        body = json.dumps(
            {
                "model": self.model,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": self.rubric},
                    {"role": "user", "content": f"PROMPT:\n{prompt}\n\nRESPONSE:\n{text}"},
                ],
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.key_env]}"
        req = urllib.request.Request(
            self.url.rstrip("/") + "/chat/completions", data=body, headers=headers, method="POST"
        )
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read())["choices"][0]["message"]["content"]
                m = _NUMBER.search(reply or "")
                return float(m.group()) if m else None
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError):
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        self.failures += 1
        return None

    def score(self, prompt: str, text: str) -> float | None:
        key = self._key(prompt, text)
        if key not in self._cache:
            s = self._request(prompt, text)
            self._cache[key] = s
            if self.cache_path is not None and s is not None:  # failures are retried next time
                with open(self.cache_path, "a") as f:
                    f.write(json.dumps({"key": key, "score": s}) + "\n")
        return self._cache[key]

    def metric(self) -> Metric:
        """A text Metric that scores each completion against the prompt it answered."""
        nan = float("nan")
        return Metric(
            f"judge:{self.model}",
            "text",
            lambda texts, prompts: [nan if (s := self.score(p, t)) is None else s for t, p in zip(texts, prompts)],
            needs_prompts=True,
        )

    def check_reachable(self) -> None:
        """Fail before any expensive work when the endpoint does not answer at all."""
        import urllib.parse

        u = urllib.parse.urlparse(self.url)
        import socket

        try:
            socket.create_connection(
                (u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=min(5.0, self.timeout)
            ).close()
        except OSError as e:
            raise SteerscopeError(
                f"the judge at {self.url} is unreachable ({e.strerror or e}); start it or fix --judge-url."
            ) from None


def judge_from(cfg, cache_path: str | Path | None = None, *, default_model: str | None = None) -> Judge | None:
    """The judge a config's `judge_*` fields name (`judge_url`, `judge_model`, `judge_key_env` and,
    where the config has one, `judge_rubric`), or None without a `judge_url`. The one place a job
    turns those fields into a Judge: run, refine and bench all call it.

    `default_model`: the model name sent when `judge_model` is unset (run sends "judge"); without
    it a URL without a model is refused, since an endpoint serving several models needs the name."""
    if not cfg.judge_url:
        return None
    model = cfg.judge_model or default_model
    if not model:
        raise SteerscopeError("--judge-url needs --judge-model (the model name the endpoint serves).")
    # bench has no judge_rubric: its LLMJudge sets one rubric per rating axis on copies of this judge
    rubric = getattr(cfg, "judge_rubric", None) or DEFAULT_RUBRIC
    return Judge(
        cfg.judge_url,
        model,
        rubric=rubric,
        key_env=cfg.judge_key_env,
        cache_path=Path(cache_path) if cache_path is not None else None,
    )
