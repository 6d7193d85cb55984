"""Decoder MLPs over sequence chunks, each checkpointed: the longest contexts' largest activations, tiled.

A gated MLP ``down(act(gate(x)) * up(x))`` makes three ``[tokens, intermediate]`` tensors (gate, up, their product)
and their gradients; with Llama-3.1-8B's intermediate size 14336 each is 28 KiB per token in bf16, 7 GiB at 256K
tokens, against 8 KiB per token for a ``[tokens, hidden]`` tensor. Activation checkpointing of the decoder layer
does not help here: the layer's replay in backward makes them all at once for the layer's backward.

`set_mlp_chunks(model, n)` gives each decoder layer's MLP an instance ``forward`` that splits its input along the
sequence into `n` chunks of ``tokens // n + 1`` rows (1 to n zero rows padded at the end, their outputs sliced off:
no gradient reaches them) and runs the class's own forward on each under non-reentrant ``torch.utils.checkpoint``;
the chunk outputs are stacked. Forward keeps each chunk's input (a view of the padded input); backward replays one
chunk at a time, so an MLP's intermediate tensors exist for ``tokens / n`` rows at once. The rows of an MLP are
independent, so the result is the untiled MLP's up to the order of floating-point sums inside the GEMMs (tested);
the cost is one more MLP forward per step (the chunk replays), on top of the layer checkpoint's replay.

Under `torch.compile` each chunk's checkpoint carries the in-graph checkpoint's selective policy
(`quickloris.parallel.compile.checkpoint_policy`: everything replayed, random draws saved). A plain checkpoint
leaves what the compiled forward saves to the partitioner, and on torch 2.11 + CUDA it saved every chunk's gate
and up outputs: all chunks' at once at the step's peak, no tiling left. Two layers of Llama-3.1-8B's shape at
1 x 32768 (`benchmarks/diag/tiled_mlp_peak.py`, H100, log in `benchmarks/results/gpu-tests/`): step peak 5.65 GiB
untiled, 4.41 GiB in 8 chunks with the plain checkpoint (16 [4097, 14336] bf16 tensors alive), 3.53 GiB with
every op marked for replay (commit dc9ce20; the policy differs from that only on random draws, and the run had
none). Eagerly the chunk checkpoint is a plain one: it keeps nothing and its replay restores the RNG state (the
same dropout masks, tested); an eager selective checkpoint would keep its saved draws in its context from the
forward on, every layer's.

The chunk count, not a chunk length, is the setting: the count is a constant for `torch.compile` (one graph for
every sequence length, as without tiling), while a fixed chunk length would make the number of chunks, and so the
graph, depend on the length. Padding to a multiple of n, rather than ``tensor_split``'s uneven chunks, keeps the
chunk sizes one symbolic expression: ``tensor_split`` made dynamo guard on ``tokens mod n`` (a graph per residue).
It traces with ``fullgraph=True`` inside the compiled decoder layer (tested). Compiled, LoRA dropout's draws are
saved, not replayed (the in-graph checkpoint's precaution against RNG replay that differs between torch releases;
tested on CPU: the eager model's masks): [tokens, intermediate + 2 x hidden] in the compute dtype per layer,
from the layer's forward to its backward, i.e. during its replay under the layer checkpoint; a cost only with
dropout.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from quickloris.models import surgery
from quickloris.parallel.compile import selective_context

STEP = "mlp_chunks"
ATTR = "quickloris_mlp_chunks"


def _chunked_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class's forward over ``self.quickloris_mlp_chunks`` sequence chunks of `x` ([..., tokens, hidden]), each
    checkpointed."""
    forward, n, t = type(self).forward, getattr(self, ATTR), x.shape[-2]
    # rows per chunk, the input padded with zero rows to n * c; always 1..n rows of padding: a padding that can be 0
    # made dynamo compile the layer once for "0" and once for "more"
    c = t // n + 1
    # Compiled: every op of a chunk replayed, said explicitly (a plain checkpoint leaves it to the partitioner, which
    # on torch 2.11 + CUDA saved each chunk's gate and up outputs). Eager: the plain checkpoint (module docstring).
    replay = selective_context() if torch.compiler.is_compiling() else noop_context_fn
    chunks = torch.nn.functional.pad(x, (0, 0, 0, n * c - t)).unflatten(-2, (n, c)).unbind(-3)
    out = torch.stack(
        [checkpoint(forward, self, chunk, use_reentrant=False, context_fn=replay) for chunk in chunks], dim=-3
    )
    return out.flatten(-3, -2)[..., :t, :]


def set_mlp_chunks(model: nn.Module, n: int) -> int:
    """Run every decoder layer's MLP (``layer.mlp``) over `n` checkpointed sequence chunks (module docstring); n = 1
    removes the tiling. Returns the number of MLPs changed. Raises if n > 1 and a decoder layer has no ``mlp``
    (a mixture-of-experts block, say)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"mlp_chunks must be an integer >= 1, got {n!r}")
    surgery.undo(model, STEP)
    if n == 1:
        return 0
    from quickloris.models.families import decoder_layers

    selective_context()  # made here, eagerly: the traced forward only looks it up
    layers = list(decoder_layers(model))
    missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), nn.Module)]
    if missing:
        raise ValueError(
            f"mlp_chunks={n}: decoder layer {missing[0]} of {type(surgery.unwrap(model)).__name__} has no `mlp` "
            "module to tile"
        )
    for layer in layers:
        mlp = layer.mlp
        surgery.set_attribute(model, STEP, mlp, ATTR, n, "sequence chunks of the MLP")
        surgery.set_attribute(
            model,
            STEP,
            mlp,
            "forward",
            types.MethodType(_chunked_forward, mlp),
            f"MLP over {n} sequence chunks, each checkpointed",
        )
    return len(layers)
