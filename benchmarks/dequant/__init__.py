"""`quickloris bench dequant`: NF4 dequantization against Unsloth, bitsandbytes and PEFT (bench.py)."""
