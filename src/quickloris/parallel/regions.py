"""Compiling one module as a region: ``module.compile`` with dynamo's duck sizing off and Python floats specialised.

Used by `quickloris.parallel.compile` (decoder layers, the final norm) and `quickloris.parallel.compiled_loss`
(the loss chunk), so neither imports the other for it.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


def compile_region(module: nn.Module, **kw: Any) -> nn.Module:
    """``module.compile(**kw)``, its compilations traced under `traced_as_region`'s settings."""
    module.compile(**kw)
    inner = getattr(module, "_compiled_call_impl", None)
    if inner is not None:
        module._compiled_call_impl = traced_as_region(inner)
    return module


def traced_as_region(fn):
    """`fn` (a compiled callable) with dynamo's traces made under two settings (read when dynamo starts a trace,
    i.e. inside the call, so they are set around each call):

    * ``use_duck_shape=False``: duck sizing gives input dimensions that happen to be equal at the first trace one
      shared symbol, guarded equal from then on: a BlockMask with 2 blocks at batch size 2 would make every later
      length recompile. Each dimension gets its own symbol instead.
    * ``specialize_float=True``: under ``dynamic=True`` dynamo makes each Python float it reads (RMSNorm's
      ``variance_epsilon``, a LoRA layer's ``scaling`` and ``lora_dropout``) a symbolic input; these fixed
      hyperparameters cannot stay symbolic through the graph, so it traced the whole layer twice ("Restarting
      analysis due to ... _tensorify_python_scalars", about half the region's compile time) and specialised them
      anyway. Specialised from the start: one trace, the same graph.
    """
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    wanted = [
        (config, name, value)
        for config, name, value in ((fx_config, "use_duck_shape", False), (dynamo_config, "specialize_float", True))
        if hasattr(config, name)
    ]
    if not wanted:  # pragma: no cover - other torch versions
        return fn

    # Set and restored around every call (a decoder layer is called twice a step per layer, forward and recompute):
    # plain attribute writes cost a third of `config.patch`'s context manager (~30 vs ~160 us for the pair on the
    # 2-core CI machine).
    @functools.wraps(fn)
    def call(*args, **kwargs):
        saved = [getattr(config, name) for config, name, _ in wanted]
        for config, name, value in wanted:
            setattr(config, name, value)
        try:
            return fn(*args, **kwargs)
        finally:
            for (config, name, _), value in zip(wanted, saved):
                setattr(config, name, value)

    return call
