"""Triton kernels, each with its pure-PyTorch reference next to it (quant/ or the kernel module)."""
