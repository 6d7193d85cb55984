"""What a `quickloris` command prints besides its own lines: progress bars, and other libraries' messages.

`command_console(progress)` wraps the work of `quickloris train`, `eval` and `export`:

* Progress bars follow one switch (`quickloris.utils.progress`): ``--progress`` / ``--no-progress``, unset: shown
  when stderr is a terminal, by rank 0 alone under torchrun (the ranks share the terminal). transformers' bars
  that it lets callers switch off (weight loading) follow it too.
* Messages that ask the user to do something they need not do are dropped, each matched by its logger and the
  start of its text (`LOG_NOISE`). Everything else those libraries say, and every error, still prints. The filters
  are added when the command starts and removed when it ends: nothing is patched, and Python callers of the
  library see the libraries' messages unchanged.

The FutureWarnings a transformers newer than the tested 5.17 prints on every run (``gradient_checkpointing_*``,
``rope_scaling``: deprecations of APIs quickloris calls) are not dropped: they say what to change before raising
the version bound in pyproject.toml, which keeps a plain install on 5.17.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from quickloris.utils.progress import bars_enabled, progress_bars

# (logger, start of the message): why it is not the user's to act on.
LOG_NOISE: dict[tuple[str, str], str] = {
    (
        "transformers.tokenization_utils_tokenizers",
        "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer",
    ): "transformers already leaves decoded BPE text as is, which is what quickloris wants; the flag comes with the "
    "model's tokenizer files (the tokenizer transformers builds from a GGUF file sets it), not from the user",
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ): "bitsandbytes tries to fetch an optional CPU 4-bit matmul from the model hub when it is imported on a CPU "
    "with AVX512-BF16, and asks for `pip install kernels`; quickloris never calls that matmul (its NF4 layers "
    "dequantize with its own kernels) and downloads nothing at run time",
}


class _DropNoise(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is the logger's own problem: let it through
            return True
        return not text.startswith(self.prefixes)


@contextlib.contextmanager
def quiet_noise() -> Iterator[None]:
    """Within the block, the messages of `LOG_NOISE` are dropped (nothing else)."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in LOG_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    added = [(logging.getLogger(name), _DropNoise(prefixes)) for name, prefixes in by_logger.items()]
    for logger, f in added:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in added:
            logger.removeFilter(f)


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers' own switch for its bars (weight loading), set for the block and restored after it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def command_console(progress: bool | None) -> Iterator[None]:
    """The output policy of one command: bars per `progress` (None: on a terminal, rank 0 only), the noise dropped."""
    if progress is None and os.environ.get("RANK", "0") not in ("", "0"):
        progress = False
    with progress_bars(progress), quiet_noise(), _transformers_bars(bars_enabled(progress)):
        yield
