"""Atomic writes: the file appears whole or not at all, with the mode a plain open() gives it (the umask's)."""

from __future__ import annotations

import os
import stat

import pytest

from quickloris.utils.atomic import atomic_open, atomic_write_json


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "a.json", "w") as f:
            f.write("{half")
            raise RuntimeError
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
