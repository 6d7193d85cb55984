"""The dequant harness' bookkeeping on CPU (its timings need a GPU): the bytes its floor is made of, and the
one-line record when Unsloth is not installed."""

from __future__ import annotations

import pytest

from benchmarks.dequant import harness


def test_harness_bytes_count_every_matrix_of_every_config():
    # by hand: per config 3 matrices of n = hd x m: n/2 packed + n/64 absmax + 4 B per 256 blocks + 2n output
    n1, n2, n3 = 1024 * 4096, 4096 * 14336, 2048 * 8192
    per_iter = sum(3 * (n // 2 + n // 64 + 4 * (n // 16384) + 2 * n) for n in (n1, n2, n3))
    assert harness.harness_bytes(1) == per_iter
    assert harness.harness_bytes(1000) == 1000 * per_iter
    assert 600e9 < harness.harness_bytes(1000) < 602e9  # "moves about 600 GB" (issue 15)


def test_unsloth_without_its_site_is_recorded_not_imitated(monkeypatch):
    monkeypatch.delenv(harness.SITE_ENV, raising=False)
    got = harness.run_in_process("unsloth_fast_dequantize", iters=1, repeats=1)
    assert set(got) == {"error"} and harness.SITE_ENV in got["error"]


def test_unknown_implementation():
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        harness.function("nope")


def test_unsloth_per_matrix_column_without_its_site_is_recorded_not_imitated(monkeypatch):
    """The per-matrix table's Unsloth column comes from its real function in a child process too (there is no
    emulated call sequence any more): without the site folder the record says why it is missing."""
    monkeypatch.delenv(harness.SITE_ENV, raising=False)
    got = harness.run_in_process("unsloth_fast_dequantize", iters=1, repeats=1, matrices=True)
    assert set(got) == {"error"} and harness.SITE_ENV in got["error"]


def test_child_per_matrix_mode_reports_errors_as_one_json_line(capsys):
    """The child's --matrices mode prints one JSON line the parent parses, also when it cannot run (here: a
    CPU-only machine has no CUDA for the bitsandbytes layers)."""
    import json

    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU record")
    assert harness.main(["torch_empty_floor", "--matrices"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"error"}
