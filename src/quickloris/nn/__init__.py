"""Modules: the NF4 weight tensor subclass and the QLoRA linear layer (no transformers import)."""
