"""Scale-out and speed: FSDP2 sharding, regional torch.compile, activation checkpointing."""
