"""Export of fine-tuned models (GGUF through the C++ core in csrc/)."""
