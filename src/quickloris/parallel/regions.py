"""Compiling one module as a region: ``module.compile`` with dynamo's duck sizing off.

Used by `quickloris.parallel.compile` (decoder layers, the final norm) and `quickloris.parallel.compiled_loss`
(the loss chunk), so neither imports the other for it.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


def compile_region(module: nn.Module, **kw: Any) -> nn.Module:
    """``module.compile(**kw)``, its compilations traced without duck sizing.

    Duck sizing gives input dimensions that happen to be equal at the first trace one shared symbol, guarded
    equal from then on: a BlockMask with 2 blocks at batch size 2 would make every later length recompile. Each
    dimension gets its own symbol instead (the setting is read when dynamo starts a trace, i.e. inside the call).
    """
    module.compile(**kw)
    inner = getattr(module, "_compiled_call_impl", None)
    if inner is not None:
        module._compiled_call_impl = without_duck_sizing(inner)
    return module


def without_duck_sizing(fn):
    """`fn` (a compiled callable) with dynamo's traces made under ``use_duck_shape=False``."""
    import torch.fx.experimental._config as fx_config

    if not hasattr(fx_config, "use_duck_shape"):  # pragma: no cover - other torch versions
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with fx_config.patch(use_duck_shape=False):
            return fn(*args, **kwargs)

    return call
