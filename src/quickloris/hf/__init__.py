"""Hugging Face Trainer / TRL integration (imports transformers)."""
