"""Our F32 export against llama.cpp's own converter (convert_hf_to_gguf.py) on tiny models of every family: the same
tensors (names, shapes, types, values bit for bit) and the same hyper-parameters.

The converter comes from the llama.cpp tree the llama-cpp-python sdist vendors (tests/export/llama_cpp_ref.py: fetched
once into the cache folder with ``pip download``, or ``QUICKLORIS_LLAMA_CPP_SRC``); all cases convert in one
subprocess, once per module, from models drawn with the module's seed.

Vocabularies are left out on the converter's side (Gemma's and Phi-3's converters read a SentencePiece model); the
file's extra keys are ours by design: `vocab_size`, `rope.dimension_count`, `rope.freq_base` (Gemma-2, llama.cpp's
default), `attention.key_length` / `value_length` (hidden / heads), all values llama.cpp derives the same way.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch

from quickloris.export import export_gguf
from tests.export import llama_cpp_ref as ref
from tests.export.family_models import family_model
from tests.helpers import missing_dependency

EXTRA_KEYS = ("vocab_size", "rope.dimension_count", "rope.freq_base", "attention.key_length", "attention.value_length")
CASES = {
    "gemma2": ("gemma2", {}),
    "gemma3": (
        "gemma3",
        dict(
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            }
        ),
    ),
    "phi3": ("phi3", dict(sliding_window=100)),
    "phi3-longrope": (
        "phi3",
        dict(
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "long_factor": [1.5] * 8,
                "short_factor": [1.1] * 8,
            },
            original_max_position_embeddings=16,
            max_position_embeddings=64,
        ),
    ),
    "mistral-nemo": ("mistral", {}),
    "qwen2.5": ("qwen2", {}),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, bpe_tokenizer):
    """case -> (our F32 file, the converter's F32 file)."""
    try:
        ref.source_tree()
    except Exception as e:  # noqa: BLE001 - no network / pip: the reference is missing, say so in one line
        missing_dependency("llama.cpp's converter", f"the llama-cpp-python sdist could not be fetched ({e})")
    seed = int(os.environ.get("QUICKLORIS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"converter parity seed {seed} (replay: QUICKLORIS_TEST_SEED={seed})")
    root = tmp_path_factory.mktemp("converter-parity")
    tokenizer = bpe_tokenizer
    pairs, steps = {}, []
    for i, (case, (kind, extra)) in enumerate(CASES.items()):
        torch.manual_seed(seed + i)
        model = family_model(kind, vocab_size=len(tokenizer), **extra)
        folder = root / case
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        pairs[case] = (root / f"{case}-ours.gguf", root / f"{case}-ref.gguf")
        export_gguf(model, pairs[case][0], tokenizer=tokenizer, quant="f32")
        steps.append(ref.hf_step(folder, pairs[case][1], "f32"))
    ref.run_steps(steps)
    return pairs


@pytest.mark.parametrize("case", list(CASES))
def test_tensors_and_keys_equal_llama_cpp_converter(case, converted):
    ours, theirs = converted[case]
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ta[name].data), np.asarray(t.data)), name
    skip = ("tokenizer.", "GGUF.", "general.name", "general.size_label")
    fa = {k: v.contents() for k, v in a.fields.items() if not k.startswith(skip)}
    fb = {k: v.contents() for k, v in b.fields.items() if not k.startswith(skip)}
    for key, value in fb.items():
        assert fa.get(key) == pytest.approx(value, rel=1e-7) if isinstance(value, float) else fa.get(key) == value, key
    assert all(k.split(".", 1)[1] in EXTRA_KEYS for k in set(fa) - set(fb)), set(fa) - set(fb)
