"""Terminal output of ``gemma-mesh stream`` and ``demo``: rich live view on a TTY, plain lines when piped.

Plain lines (one per completed thing, so ``grep``/``tee`` see whole results):
``final  [00:01.20-00:04.50] #3 text``, ``translation(de) [..] #3 text``, ``frame  [00:02.00] #1 text``,
``warning code: message``, ``error code: message``; partial hypotheses only with ``partials=True``.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text


def _ts(ms: int) -> str:
    return f"{ms // 60000:02d}:{ms % 60000 / 1000:05.2f}"


class StreamView:
    """Feed events with ``on_event``; use as a context manager around the stream."""

    def __init__(
        self, *, rich_output: bool | None = None, partials: bool = False, out: TextIO | None = None
    ) -> None:
        self.out = out or sys.stdout
        self.rich = self.out.isatty() if rich_output is None else rich_output
        self.partials = partials
        self.finals: list[str] = []
        self.partial: dict | None = None
        self.analyses: dict[int, str] = {}
        self.notes: list[str] = []
        self._live: Live | None = None

    def __enter__(self) -> StreamView:
        if self.rich:
            self._live = Live(self._render(), console=Console(file=self.out), refresh_per_second=8)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def _line(self, text: str) -> None:
        if not self.rich:
            print(text, file=self.out, flush=True)

    def on_event(self, event: dict) -> None:
        kind = event["type"]
        if kind in ("caption.final", "translation.final"):
            label = "final " if kind == "caption.final" else f"translation({event['language']})"
            line = f"{label} [{_ts(event['start_ms'])}-{_ts(event['end_ms'])}] #{event['segment_id']} {event['text']}"
            self.finals.append(line)
            self.partial = None
            self._line(line)
        elif kind in ("caption.partial", "translation.partial"):
            self.partial = event
            if self.partials:
                self._line(f"partial [{_ts(event['start_ms'])}-{_ts(event['end_ms'])}] {event['text']}")
        elif kind == "frame.analysis":
            self.analyses[event["analysis_id"]] = (
                f"frame  [{_ts(event['frame_ms'])}] #{event['analysis_id']} "
            )
            self.analyses[event["analysis_id"]] += event["text"]
            if event["done"]:
                self._line(self.analyses[event["analysis_id"]])
        elif kind in ("warning", "error"):
            note = f"{kind} {event['code']}: {event['message']}"
            self.notes.append(note)
            self._line(note)
        elif kind == "session.started":
            self._line(f"session {event['session_id']} {'resumed' if event['resumed'] else 'started'}")
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        parts: list[Text] = [Text("captions", style="bold")]
        parts += [Text(line) for line in self.finals[-12:]]
        if self.partial is not None:
            line = Text(f"…      [{_ts(self.partial['start_ms'])}-{_ts(self.partial['end_ms'])}] ")
            line.append(self.partial["committed"], style="bold")
            line.append(" " + self.partial["tentative"], style="dim italic")
            parts.append(line)
        if self.analyses:
            parts.append(Text("frame analysis", style="bold"))
            parts += [Text(v) for _, v in sorted(self.analyses.items())[-4:]]
        parts += [Text(n, style="yellow") for n in self.notes[-4:]]
        return Group(*parts)
