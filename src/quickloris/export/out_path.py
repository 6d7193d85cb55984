"""Checks on the file an export writes, made before anything is loaded or written.

Refused, each with one line naming the option: an output that is an input of the export (the ``--model`` file,
a file of the ``--model``, ``--adapter`` or ``--tokenizer`` folder; compared as files, so symbolic links, hard
links and relative paths are seen through), even with ``--overwrite``; an existing file without ``--overwrite``;
a folder; a missing or unwritable parent folder (it is not created: a typo in a path should not make a tree).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def input_files(
    model: Path | None,
    *,
    model_is_file: bool,
    adapter: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> list[tuple[Path, str]]:
    """(file, description) of every file an export from these sources reads: the model file, or the files of
    the model folder (.gguf files in it aside: earlier exports), the adapter's and the tokenizer folder's files."""
    out: list[tuple[Path, str]] = []
    if model is not None:
        if model_is_file:
            out.append((model, "the --model file"))
        else:
            out += [(p, "a file of the --model folder") for p in _files(model) if p.suffix.lower() != ".gguf"]
    if adapter is not None:
        out += [(p, "a file of the --adapter folder") for p in _files(Path(adapter))]
    if tokenizer is not None:
        out += [(p, "a file of the --tokenizer folder") for p in _files(Path(tokenizer)) if p.suffix.lower() != ".gguf"]
    return out


def _files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return []


def check_out(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[tuple[Path, str]] = (),
    option: str = "--out",
    overwrite_option: str = "--overwrite",
) -> Path:
    """Raise (one line naming `option`) unless `out` may be written; returns it as a Path."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{option} {out} is a folder; name the file to write, e.g. {path / 'model.gguf'}")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{option} {out}: folder {parent} does not exist (it is not created; make it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {out}: folder {parent} is not writable")
    if path.exists():
        for source, what in inputs:
            if _same_file(path, source):
                raise ValueError(
                    f"{option} {out} is {what} ({source}): an export never writes over its own input; "
                    f"choose another path ({overwrite_option} does not apply to inputs)"
                )
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{option} {out} already exists; pass {overwrite_option} to replace it")
    return path
