"""Model preparation for Hugging Face models (imports transformers): quantize, add LoRA, losses."""
