"""`submit --wait` and `demo` progress: a tqdm bar on a terminal, plain lines otherwise, ending on total/total."""
from __future__ import annotations

import io

from maskfleet.cli import _follow


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Handle:
    """A job seen through `status()` polls: these PROGRESS metas, then SUCCESS."""

    def __init__(self, steps: list[tuple[int, str]], total: int):
        self.polls = [{"state": "PROGRESS", "meta": {"step": s, "total": total, "sampler": w, "phase": "sampling"}}
                      for s, w in steps] + [{"state": "SUCCESS", "meta": {"output": "x"}}]

    def status(self) -> dict:
        return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]


def test_plain_lines_when_not_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    status = _follow(Handle([(1, "base"), (1, "base"), (3, "mask")], total=6), quiet=False)
    assert status["state"] == "SUCCESS"
    assert err.getvalue().splitlines() == ["[maskfleet] step 1/6 (base sampler)", "[maskfleet] step 3/6 (mask sampler)",
                                           "[maskfleet] step 6/6 (mask sampler)"]  # the end, once


def test_a_bar_on_a_terminal(monkeypatch):
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    _follow(Handle([(1, "base"), (4, "mask")], total=6), quiet=False)
    shown = err.getvalue()
    assert "[maskfleet] step" not in shown  # no lines: one bar redrawn in place
    frames = [f for f in shown.split("\r") if f.strip()]
    assert any("1/6" in f and "base sampler" in f for f in frames)
    assert "6/6" in frames[-1] and "100%" in frames[-1] and "mask sampler" in frames[-1]
    assert shown.endswith("\n")  # closed: the prompt comes back on a line of its own


def test_quiet_shows_nothing(monkeypatch):
    for stream in (io.StringIO(), Terminal()):
        monkeypatch.setattr("sys.stderr", stream)
        _follow(Handle([(2, "base")], total=6), quiet=True)
        assert stream.getvalue() == ""
