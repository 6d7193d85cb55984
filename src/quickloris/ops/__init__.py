"""Autograd ops: torch.autograd.Functions built on kernels (chunked linear+loss, NF4+LoRA linear)."""
