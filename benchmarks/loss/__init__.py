"""`quickloris bench loss`: chunked linear + loss vs full logits (bench.py; models.py: the model-level runs)."""
