"""`quickloris bench fsdp` (bench.py launches worker.py under torchrun); link_bandwidth.py: NCCL bandwidth."""
