"""`steerscope serve` settings (importable without FastAPI, so the CLI can list them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config
from ..errors import SteerscopeError
from ..models.loading import ModelConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig(Config):
    """`steerscope serve` settings (the model comes from ModelConfig)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the model"""
    vectors: list[str] = field(default_factory=list, metadata={"append": True})
    """a vector-set folder or a .gguf control vector to serve, named after the folder/file (repeatable)"""
    host: str = "127.0.0.1"
    """interface to bind; anything but loopback needs --api-key-env"""
    port: int = field(default=8000, metadata={"min": 0, "max": 65535})
    """TCP port (0: any free port, printed at start)"""
    api_key_env: str | None = field(default=None, metadata={"none": "none"})
    """name of an environment variable holding the API key clients must send as `Authorization: Bearer KEY`"""
    max_batch: int = field(default=32, metadata={"min": 1})
    """most requests decoded together (rows of one batch)"""
    batch_window_ms: float = field(default=5.0, metadata={"min": 0})
    """when idle, wait this long after a request for others to batch with it"""
    max_queue: int = field(default=256, metadata={"min": 1})
    """most requests waiting for a row; more get HTTP 429"""
    max_tokens_limit: int = field(default=1024, metadata={"min": 1})
    """largest max_tokens a request may ask for"""
    default_max_tokens: int = field(default=128, metadata={"min": 1})
    """max_tokens when a request gives none"""
    max_vectors_per_request: int = field(default=8, metadata={"min": 1})
    """most steering vectors (additions + ablations) in one request"""
    max_prompt_tokens: int = field(default=4096, metadata={"min": 1})
    """longest prompt in tokens (prompt + max_tokens must also fit the model's context)"""
    max_steer_ratio: float = field(default=100.0, metadata={"min": 0})
    """largest steering vector a request or upload may use, |coef x vector|, as a multiple of the model's median residual norm at the vector's layer"""
    max_body_kb: int = field(default=8192, metadata={"min": 1})
    """largest request body in KiB (vector uploads are base64 in JSON)"""
    kv_cache: bool = True
    """decode with the KV cache (--no-kv-cache recomputes every step: slower, the same tokens)"""
    allow_other_model: bool = False
    """accept vectors whose model fingerprint differs (e.g. made on the base of a fine-tune)"""

    def check(self) -> str | None:
        """The API key (None when none is configured), or one line saying what is wrong."""
        import os

        key = None
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise SteerscopeError(
                    f"--api-key-env {self.api_key_env}: that environment variable is empty or unset; export it first."
                )
        if self.host not in LOOPBACK and key is None:
            raise SteerscopeError(
                f"refusing to bind {self.host} without an API key: pass --api-key-env VAR "
                "(clients then send `Authorization: Bearer $VAR`) or keep --host 127.0.0.1."
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise SteerscopeError("--default-max-tokens is larger than --max-tokens-limit; lower it.")
        return key
