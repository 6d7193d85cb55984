"""Progress bars: drawn on a terminal, not into a pipe or a file, unless forced on or off (explicit flag first,
then the command's setting); a hidden bar takes the same calls."""

from __future__ import annotations

import io
import sys

import pytest

from quickloris.utils.progress import bars_enabled, progress, progress_bars


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        super().isatty()  # raises ValueError once closed, as a real stream does
        return self.tty


def test_terminal_decides_when_nothing_is_forced():
    assert bars_enabled(file=Stream(tty=True)) is True
    assert bars_enabled(file=Stream(tty=False)) is False
    closed = Stream(tty=True)
    closed.close()  # isatty() on a closed stream raises ValueError: no bar
    assert bars_enabled(file=closed) is False
    assert bars_enabled(file=object()) is False  # no isatty at all


@pytest.mark.parametrize("tty", [True, False])
def test_forcing_order(tty):
    s = Stream(tty)
    with progress_bars(not tty):
        assert bars_enabled(file=s) is (not tty)  # the command's setting beats the terminal check
        assert bars_enabled(tty, file=s) is tty  # an explicit flag beats the command's setting
        with progress_bars(None):
            assert bars_enabled(file=s) is tty
    assert bars_enabled(file=s) is tty  # restored after the block


def test_restored_after_an_error():
    with pytest.raises(RuntimeError), progress_bars(True):
        raise RuntimeError
    assert bars_enabled(file=Stream(tty=False)) is False


@pytest.mark.parametrize("forced", [True, None, False])
def test_bar_drawn_only_when_enabled(forced):
    s = Stream(tty=False)
    with progress_bars(forced):
        items = list(progress(range(5), desc="thing", unit="item", file=s))
        bar = progress(total=3, desc="other", unit="x", file=s)
        bar.update(3)
        bar.set_postfix_str("note")
        bar.close()
    assert items == [0, 1, 2, 3, 4]  # iterates either way
    text = s.getvalue()
    if forced:
        assert "thing: 100%" in text and "5/5" in text and "item" in text
        assert "other: 100%" in text and "3/3" in text
    else:
        assert text == ""


def test_default_stream_is_stderr(monkeypatch):
    s = Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", s)
    bar = progress(total=2, desc="tty", unit="step")
    bar.update(2)
    bar.close()
    assert "tty: 100%" in s.getvalue() and "2/2" in s.getvalue()
