"""The NF4 weight as a traceable tensor subclass (`NF4Tensor`), with the views FSDP2 takes of it.

A layer between the kernels and the autograd ops: `quickloris.ops` computes with these weights, `quickloris.nn`
holds them in modules. Importing the package registers every op handler (`nf4_tensor`'s own, then `nf4_views`').
"""

from quickloris.tensor import nf4_views  # noqa: F401  (registers the FSDP2 view handlers)
from quickloris.tensor.nf4_tensor import NF4Tensor

__all__ = ["NF4Tensor"]
