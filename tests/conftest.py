"""Shared test setup.

* Without a CUDA GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be
  set before any `@triton.jit` is decorated, so it happens here at import time.
* Under ``ATEN_CPU_CAPABILITY`` Inductor's cache moves to a directory of that capability (below).
* `gpu` / `multigpu` tests skip with a reason where the hardware is missing (run them on the device:
  docs/device.md).
* `seed`: a fresh random seed per test, printed (shown with a failure) and reproducible with
  ``QUICKLORIS_TEST_SEED=N``; ``QUICKLORIS_TEST_SEEDS=A-B`` runs every randomized test once per seed in A..B.
* tests/helpers.py: `require` (a dependency CI installs: missing, the test fails), `within` (a bound whose margin
  scripts/seed_margins.py reports); tests/tiny.py: the tiny random models and tokenizers of the suite.
"""

from __future__ import annotations

import os

import pytest
import torch

import tests.helpers  # noqa: F401  (margin runs: measures torch.testing.assert_close from the start)

HAS_CUDA = torch.cuda.is_available()
N_GPUS = torch.cuda.device_count() if HAS_CUDA else 0

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A run told which CPU kernels to use (ATEN_CPU_CAPABILITY=default / avx2: the README's tolerance check) gets an
# Inductor cache of its own: loading the C++ kernels the shared cache holds from runs at this machine's own
# capability (avx512), the two Inductor CPU tests computed NaN under avx2 (torch 2.13); with their own cache they pass.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: docs/device.md)")
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs, found {N_GPUS} (docs/device.md)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and N_GPUS < 2:
            item.add_marker(skip_multi)


def _seed_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def pytest_generate_tests(metafunc):
    seeds = os.environ.get("QUICKLORIS_TEST_SEEDS")
    if seeds and "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", _seed_range(seeds), indirect=True, ids=lambda s: f"seed{s}")


@pytest.fixture
def seed(request):
    """A fresh seed per test run, printed (pytest shows it with a failure), so each run checks new random inputs;
    QUICKLORIS_TEST_SEED=N replays a run."""
    if hasattr(request, "param"):
        value = int(request.param)
    elif os.environ.get("QUICKLORIS_TEST_SEED"):
        value = int(os.environ["QUICKLORIS_TEST_SEED"])
    else:
        value = int.from_bytes(os.urandom(4), "little")
    print(f"seed {value} (replay: QUICKLORIS_TEST_SEED={value} pytest {request.node.nodeid})")
    torch.manual_seed(value)
    return value


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread is several times faster than two on a shared 2-core CI machine
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _name_the_test(request):
    """Margin runs: tolerance checks (also in processes the test spawns) record under this test's name."""
    if os.environ.get("QUICKLORIS_MARGIN_LOG"):
        os.environ["QUICKLORIS_MARGIN_TEST"] = request.node.nodeid
        yield
        os.environ.pop("QUICKLORIS_MARGIN_TEST", None)
    else:
        yield


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    """GPU tests share a pytest-xdist worker process: each starts from an empty dynamo cache, so compiles of the same
    decoder-layer code (Qwen2VLDecoderLayer.forward for several tiny models, dtypes and shapes) by earlier tests do
    not add up to the recompile limit (8 entries), which fullgraph turns into a hard failure in whichever test comes
    ninth (seen at 6669e0d on an H200: test_eval_vision's run). CPU tests keep the shared cache (their compile time
    is CI's budget)."""
    if request.node.get_closest_marker("gpu") or request.node.get_closest_marker("multigpu"):
        import torch._dynamo

        torch._dynamo.reset()
    yield
