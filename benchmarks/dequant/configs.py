"""The specification's harness configurations (challenge part A), shared by the bench and its harness."""

HARNESS_CONFIGS = [  # (bsz, qlen, hd, m, seed, dtype name), verbatim from the specification
    (5, 777, 1024, 4096, 3409, "bfloat16"),
    (3, 2048, 4096, 14336, 3408, "bfloat16"),
    (2, 3333, 2048, 8192, 3407, "float16"),
]
