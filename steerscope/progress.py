"""The one home for progress: bars with an ETA, and the job log.

`bar(total, desc)` is what every long loop uses (discovery steps, R calibration and search,
generation, activations, selection, SAE training, corpus sampling, distillation, sweeps):

* stderr is a terminal: a tqdm bar with rate and ETA (shown after `DELAY` s, so quick loops do
  not flash one);
* stderr is not a terminal (a pipe, a log file, a batch job): throttled plain lines, one when the
  loop has run `DELAY` s, then about every 10 % or every 30 s, and one at the end, each with the
  elapsed time and the ETA. tqdm's own output there is carriage-return garbage or nothing;
* a job log is active (`job_log(path)`, which `jobs.stages.run_stages` opens on OUT/log.txt):
  the same throttled lines, with a timestamp, appended to it (also on a terminal).

A loop that ends within `DELAY` s prints nothing, and a bar with total 0 never does. Nothing goes
to stdout, which commands may print results on. `show=False` silences a bar everywhere (for a
loop inside another loop's bar). `say(msg)` prints a job's message to stderr and logs it; `note`
only logs.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "log.txt"  # a job's log inside its output folder
DELAY = 2.0  # seconds before a bar shows anything
EVERY_FRACTION = 0.1  # a plain line at each further 10 %
EVERY_SECONDS = 30.0  # ... or when this long has passed since the last one

_logs: list[Path] = []  # the active job logs, innermost last
_lock = threading.Lock()  # timer threads and the main thread write the same files


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def note(msg: str) -> None:
    """Append `msg` with a timestamp to the active job log (nothing when none is active)."""
    if not _logs:
        return
    with _lock:
        try:
            with _logs[-1].open("a", encoding="utf-8") as f:
                f.write(f"{_stamp()} {msg}\n")
        except OSError:  # a log that cannot be written must not stop the job it describes
            pass


def say(msg: str) -> None:
    """A job's message: to stderr (never stdout: results may be parsed there) and the job log."""
    print(msg, file=sys.stderr, flush=True)
    note(msg)


@contextmanager
def job_log(path: str | Path) -> Iterator[Path]:
    """Make `path` the job log while the block runs; lines are appended (a resumed job continues
    the same file). Re-entering with the log already active adds nothing."""
    path = Path(path)
    if _logs and _logs[-1] == path:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _logs.append(path)
    try:
        yield path
    finally:
        _logs.pop()


def active_log() -> Path | None:
    return _logs[-1] if _logs else None


def duration(seconds: float) -> str:
    """`75.2` -> `1m15s`; `3725` -> `1h02m05s`; under a minute: `12s`."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Bar:
    """A progress bar; use `bar(...)`. `update(n)`, `set_postfix(**kw)`, `close()` as in tqdm,
    and a context manager."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "step",
        *,
        show: bool | None = None,
        initial: int = 0,
        delay: float | None = None,
        every: float | None = None,
        every_s: float | None = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        # Read at each call, not bound at import: tests and callers may change the module's defaults.
        self.delay = DELAY if delay is None else delay
        self.every = EVERY_FRACTION if every is None else every
        self.every_s = EVERY_SECONDS if every_s is None else every_s
        self.postfix = ""
        self.t0 = time.monotonic()
        self._last: float | None = None  # when the last plain line went out; None: none yet
        self._next_step = 0  # the next line is due at this many `every`s of the total
        self._closed = False
        self._mutex = threading.Lock()
        self._timer: threading.Timer | None = None
        empty = total is not None and total <= 0
        tty = sys.stderr.isatty()
        self._plain = show is not False and not tty and not empty  # lines to stderr
        self._log = active_log() if show is not False and not empty else None  # lines to the job log
        self._tqdm = None
        if show is not False and tty and not empty:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                leave=False,
                delay=self.delay,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        if self._plain or self._log is not None:
            self._arm(self.delay)

    # ---- tqdm's interface -----------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        if self._closed:
            return
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        self._maybe_line()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())
        if self._tqdm is not None:
            self._tqdm.set_postfix(refresh=False, **kw)  # drawn at the next update, after the delay

    def start_at(self, n: int) -> None:
        """A resumed loop starts at step `n`: counted as done, left out of the rate."""
        if self._tqdm is not None:
            self._tqdm.update(n - self.n)
        self.n = self.initial = n

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._last is not None:  # a loop that said it started also says it ended
                self._emit(
                    f"{self.desc}: done, {self.n} {self._units(self.n)} in {duration(time.monotonic() - self.t0)}"
                    + (f" ({self.postfix})" if self.postfix else "")
                )
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the plain lines ------------------------------------------------------------------------
    def line(self) -> str:
        """`generating: 64/320 rows (20%), 41s elapsed, ETA 2m44s`."""
        el = time.monotonic() - self.t0
        done = self.n - self.initial
        if self.total:
            head = f"{self.desc}: {self.n}/{self.total} {self._units(self.total)} ({self.n / self.total:.0%})"
            eta = duration((self.total - self.n) * el / done) if done > 0 else "unknown"
            tail = f", ETA {eta}"
        else:
            head, tail = f"{self.desc}: {self.n} {self._units(self.n)}", ""
        return f"{head}, {duration(el)} elapsed{tail}" + (f" ({self.postfix})" if self.postfix else "")

    def _units(self, k: int) -> str:
        """`row` -> `rows`, `pass` -> `passes` (tqdm's unit is a rate's: rows/s is row/s there)."""
        if k == 1:
            return self.unit
        return self.unit + ("es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s")

    def _emit(self, text: str) -> None:
        self._last = time.monotonic()
        if self._plain:
            print(f"  {text}", file=sys.stderr, flush=True)
        if self._log is not None:
            with _lock:
                try:
                    with self._log.open("a", encoding="utf-8") as f:
                        f.write(f"{_stamp()}   {text}\n")
                except OSError:
                    pass

    def _due(self, now: float) -> bool:
        if now - self.t0 < self.delay:
            return False
        if self._last is None or now - self._last >= self.every_s:
            return True
        return bool(self.total) and self._steps() >= self._next_step

    def _steps(self) -> int:
        """How many `every`s of the total are done (the epsilon: 30 / 100 is 3 tenths, not 2.999...)."""
        return math.floor(self.n / self.total / self.every + 1e-9)

    def _mark(self) -> None:
        if self.total:  # the next 10 % step above where we are
            self._next_step = self._steps() + 1

    def _maybe_line(self) -> None:
        if not (self._plain or self._log is not None) or (self.total and self.n >= self.total):
            return  # the end line comes from close()
        with self._mutex:
            if not self._closed and self._due(time.monotonic()):
                self._emit(self.line())
                self._mark()

    def _arm(self, seconds: float) -> None:
        self._timer = threading.Timer(max(seconds, 0.05), self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        """A line even when no step finishes: the first after `delay`, then every `every_s`."""
        with self._mutex:
            if self._closed:
                return
            now = time.monotonic()
            if self._last is None or now - self._last >= self.every_s:
                self._emit(self.line())
                self._mark()
            self._arm(self._last + self.every_s - time.monotonic())


def bar(total: int | None, desc: str, unit: str = "step", *, show: bool | None = None, initial: int = 0) -> Bar:
    """A progress bar for a loop of `total` units (module docstring). `show`: None or True shows
    it (a tqdm bar on a terminal, plain lines elsewhere); False shows nothing."""
    return Bar(total, desc, unit, show=show, initial=initial)
