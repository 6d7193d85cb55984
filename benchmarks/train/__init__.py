"""`quickloris bench train` (bench.py; models.py: the stacks and the timed loop); probe_speed.py: diagnostics."""
