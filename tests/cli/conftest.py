"""Shared by the CLI tests: `quickloris train` sets torch's thread count for its run; restore it after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
