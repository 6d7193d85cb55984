"""Quantization formats: bit-exact pure-PyTorch references (NF4 as bitsandbytes stores it)."""
