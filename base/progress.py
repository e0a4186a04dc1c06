"""Progress display for long work: a tqdm bar on a terminal, plain log lines otherwise.

``EMBSCALE_PROGRESS`` overrides the choice: ``bar``, ``plain`` or ``off``. Everything goes to stderr, so a
command's standard output stays clean for results.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

# tqdm is imported where a bar is made (a tenth of `embscale plan`'s imports, which never shows one)


def progress_mode(stream: TextIO | None = None) -> str:
    """``bar`` on a terminal, ``plain`` elsewhere, unless ``EMBSCALE_PROGRESS`` says otherwise."""
    forced = os.environ.get("EMBSCALE_PROGRESS", "").strip().lower()
    if forced in ("bar", "plain", "off"):
        return forced
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Counts work towards ``total``; shows a bar (terminal) or a log line every ``min_interval_s`` seconds.

    ``update(n, **fields)`` advances by ``n`` and shows ``fields`` (loss, tokens/s, ...) next to the count.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 min_interval_s: float = 10.0, mode: str | None = None, unit_scale: bool = False):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.count = initial
        self.initial = initial
        self.min_interval_s = min_interval_s
        self.mode = mode or progress_mode()
        self.start = time.monotonic()
        self.last_line = self.start
        self.fields: dict[str, Any] = {}
        self.lines_at = initial  # the count the last plain line showed
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                            unit_scale=unit_scale, file=sys.stderr)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.count += n
        self.fields.update(fields)
        if self.bar is not None:
            if fields:
                self.bar.set_postfix({k: _format_value(v) for k, v in fields.items()}, refresh=False)
            self.bar.update(n)
        elif self.mode == "plain":
            now = time.monotonic()
            done = self.total is not None and self.count >= self.total
            if now - self.last_line >= self.min_interval_s or done:
                self._line()

    def eta_seconds(self) -> float:
        done = self.count - self.initial
        if not self.total or done <= 0:
            return float("nan")
        return (time.monotonic() - self.start) / done * (self.total - self.count)

    def _line(self) -> None:
        self.last_line = time.monotonic()
        self.lines_at = self.count
        count = f"{self.count:,}" + (f"/{self.total:,}" if self.total else "")
        parts = [f"[{self.desc}] {count} {self.unit}"]
        parts += [f"{k} {_format_value(v)}" for k, v in self.fields.items()]
        parts.append(f"elapsed {format_duration(time.monotonic() - self.start)}")
        if self.total:
            parts.append(f"eta {format_duration(self.eta_seconds())}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        """A log line that does not break the bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Ends the bar; in plain mode, a last line if there was progress since the previous one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "plain" and self.count != self.lines_at:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log(message: str) -> None:
    """A plain log line on stderr (silent when ``EMBSCALE_PROGRESS=off``), through tqdm when it is imported, so
    that a bar on the screen is not broken (without tqdm there is no bar: the line is printed)."""
    if progress_mode() == "off":
        return
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        tqdm_module.tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


__all__ = ["Progress", "format_duration", "log", "progress_mode"]
