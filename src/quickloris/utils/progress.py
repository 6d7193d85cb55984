"""Progress bars of the long steps (training, NF4 quantization, evaluation, GGUF export): one policy, one helper.

A bar is shown when stderr is a terminal and hidden otherwise (a log file or a pipe would fill with tqdm's
carriage-return redraws). A caller forces it with ``enabled=True/False`` (`TrainConfig.progress`), and a command
forces every bar it draws at once with `progress_bars(flag)`: the CLI's ``--progress`` / ``--no-progress``. An
explicit ``enabled`` wins over `progress_bars`, which wins over the terminal check.

Imports tqdm only when a bar is made; standard library otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

_FORCED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("quickloris_progress", default=None)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bars_enabled(enabled: bool | None = None, file: IO[str] | None = None) -> bool:
    """Whether a bar is drawn: `enabled` if given, else the `progress_bars` setting, else whether `file` (default
    stderr) is a terminal."""
    if enabled is not None:
        return bool(enabled)
    forced = _FORCED.get()
    if forced is not None:
        return forced
    return _is_terminal(sys.stderr if file is None else file)


@contextlib.contextmanager
def progress_bars(enabled: bool | None) -> Iterator[None]:
    """Within the block, every bar that is not told otherwise is on (True), off (False), or follows the terminal
    check (None)."""
    token = _FORCED.set(enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str = "it",
    enabled: bool | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar on stderr, drawn or not by `bars_enabled(enabled)`; `kwargs` go to tqdm (``initial``, ...). A
    hidden bar takes the same calls (``update``, ``set_postfix_str``, iteration) and does nothing."""
    from tqdm.auto import tqdm

    file = kwargs.pop("file", sys.stderr)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not bars_enabled(enabled, file),
        dynamic_ncols=True,
        file=file,
        **kwargs,
    )
