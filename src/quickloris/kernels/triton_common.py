"""What the Triton kernels share: the import (optional: CPU-only installs run the PyTorch references), whether
kernels run in Triton's CPU interpreter, and a round-to-nearest-even fp32 -> bf16 that the interpreter lacks."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton use the PyTorch paths
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def bf16_bits_rn(values):
        """float32 -> the bits of its bf16 rounding to nearest even, in the low 16 bits of a uint32, as the GPU's
        cvt.rn.bf16.f32 rounds (finite values). The interpreter's own fp32 -> bf16 cast truncates or rounds half
        up without the carry, so interpreted kernels round on the bits with this."""
        bits = values.to(tl.uint32, bitcast=True)
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16

    @triton.jit
    def _probe():
        pass


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import): jit functions are then
    not `JITFunction`s."""
    return triton is not None and not isinstance(_probe, triton.runtime.JITFunction)
