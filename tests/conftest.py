"""Shared test setup.

* Without a CUDA GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be
  set before any `@triton.jit` is decorated, so it happens here at import time.
* `gpu` / `multigpu` tests skip with a reason where the hardware is missing (run them on the device:
  docs/device.md).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
N_GPUS = torch.cuda.device_count() if HAS_CUDA else 0

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: docs/device.md)")
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs, found {N_GPUS} (docs/device.md)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and N_GPUS < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure), so each run checks new random inputs."""
    value = int.from_bytes(os.urandom(4), "little")
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
