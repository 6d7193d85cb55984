"""Our F32 export against llama.cpp's own converter (convert_hf_to_gguf.py) on tiny models of every family: the same
tensors (names, shapes, types, values bit for bit) and the same hyper-parameters.

Needs a llama.cpp source tree (the converter and its gguf-py), which CI does not have, so it skips unless
QUICKLORIS_LLAMA_CPP_SRC points at one, e.g. the one llama-cpp-python's sdist vendors:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp
    tar xzf /tmp/llama_cpp_python-0.3.36.tar.gz -C /tmp
    QUICKLORIS_LLAMA_CPP_SRC=/tmp/llama_cpp_python-0.3.36/vendor/llama.cpp pytest tests/export/test_converter_parity.py

Vocabularies are left out on the converter's side (Gemma's and Phi-3's converters read a SentencePiece model); the
file's extra keys are ours by design: `vocab_size`, `rope.dimension_count`, `rope.freq_base` (Gemma-2, llama.cpp's
default), `attention.key_length` / `value_length` (hidden / heads), all values llama.cpp derives the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from quickloris.export import export_gguf
from tests.export.family_models import family_model

SRC = os.environ.get("QUICKLORIS_LLAMA_CPP_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="QUICKLORIS_LLAMA_CPP_SRC (a llama.cpp source tree) is not set")

CONVERT = textwrap.dedent("""
    import sys
    src, model, out = sys.argv[1:4]
    sys.path[:0] = [src, src + "/gguf-py"]
    from conversion import base
    import conversion.gemma, conversion.phi, conversion.llama, conversion.qwen
    def no_vocab(self):
        self.gguf_writer.add_tokenizer_model("none")
    for mod in (conversion.gemma, conversion.phi, conversion.llama, conversion.qwen):
        for v in vars(mod).values():
            if isinstance(v, type) and issubclass(v, base.TextModel):
                v.set_vocab = no_vocab
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", "f32"]
    import convert_hf_to_gguf
    convert_hf_to_gguf.main()
""")
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


@pytest.mark.parametrize("case", list(CASES))
def test_tensors_and_keys_equal_llama_cpp_converter(case, tmp_path, bpe_tokenizer):
    kind, extra = CASES[case]
    model = family_model(kind, vocab_size=len(bpe_tokenizer), **extra)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    export_gguf(model, ours, tokenizer=bpe_tokenizer, quant="f32")
    subprocess.run([sys.executable, "-c", CONVERT, SRC, str(folder), str(ref)], check=True, capture_output=True)
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
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
