"""`quickloris bench dequant` wiring on a machine without a GPU (the measurements themselves run on the device)."""

from __future__ import annotations

import pytest
import torch

from quickloris.cli.main import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_gpu_says_so_and_fails(capsys):
    assert main(["bench", "dequant", "--iters", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "dequant", "--help"])
    out = capsys.readouterr().out
    assert "--iters" in out and "--repeats" in out and "--out" in out
