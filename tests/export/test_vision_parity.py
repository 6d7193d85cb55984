"""The GGUF vision export against llama.cpp's own converters, on tiny random-init VLMs of every family: the mmproj file
(vision tower + projector) tensor for tensor (name, ggml type, shape, bytes) and key for key (value and GGUF type),
and the language model file tensor for tensor with the converter's hyper-parameters.

The reference is the llama.cpp tree vendored by the llama-cpp-python sdist that `make test` installs (fetched once
with ``pip download`` into the cache folder, or ``QUICKLORIS_LLAMA_CPP_SRC``; tests/export/llama_cpp_ref.py):
convert_hf_to_gguf.py for Qwen2-VL / Qwen2.5-VL (``--mmproj`` for the vision file) and the Llava language models,
llama.cpp's documented Llava route (llava_surgery_v2.py + convert_image_encoder_to_gguf.py) for the Llava mmproj.
All conversions run in one subprocess, once per session, from models drawn with the session's seed.

By design the files differ in these places only: the text files' extra keys (`EXTRA_KEYS`, values llama.cpp derives
the same way), ``general.name`` / ``general.size_label``, and a Llava f32 mmproj, whose projector and patch
convolution the legacy converter writes in F16 even for f32 (ours are F32: the test checks they round to the
converter's F16 values).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch

from quickloris.export import export_gguf
from tests.export import llama_cpp_ref as ref
from tests.export import vlm_models as V
from tests.helpers import missing_dependency

# family -> mmproj types checked (the Llava converter writes f16 and f32 only; every type for Qwen across the two)
MMPROJ_CASES = {
    "qwen2_vl": ("f16", "q8_0"),
    "qwen2_5_vl": ("f32", "bf16"),
    "llava": ("f16", "f32"),
    "llava_next": ("f16",),
}
EXTRA_KEYS = ("vocab_size", "rope.dimension_count", "attention.key_length", "attention.value_length")
LLAVA_F32_IN_F16 = ("mm.0.weight", "mm.2.weight", "v.patch_embd.weight")


def _seed() -> int:
    value = int(os.environ.get("QUICKLORIS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"vision reference seed {value} (replay: QUICKLORIS_TEST_SEED={value})")
    return value


@pytest.fixture(scope="session")
def reference_files(tmp_path_factory):
    """{(family, what): (ours, reference)} for every case: the models, our exports and llama.cpp's conversions."""
    try:
        ref.source_tree()
    except Exception as e:  # noqa: BLE001 - no network / pip: the reference is missing, say so in one line
        missing_dependency("llama.cpp's converters", f"the llama-cpp-python sdist could not be fetched ({e})")
    root = tmp_path_factory.mktemp("vision-reference")
    seed = _seed()
    steps, pairs = [], {}
    for i, (family, types) in enumerate(MMPROJ_CASES.items()):
        torch.manual_seed(seed + i)
        tok = V.tokenizer(family)
        model = V.model(family, tok)
        folder = V.save(root / family, family, model, tok)
        for t in types:
            ours = root / f"ours-{family}-{t}.gguf"
            export_gguf(model, ours, tokenizer=tok, quant="f32", mmproj_quant=t, processor=folder)
            pairs[(family, t)] = (str(ours).replace(".gguf", ".mmproj.gguf"), root / f"ref-{family}-{t}.gguf")
        pairs[(family, "text")] = (root / f"ours-{family}-{types[0]}.gguf", root / f"ref-{family}-text.gguf")
        if family.startswith("qwen"):
            steps += [ref.hf_step(folder, pairs[(family, t)][1], t, mmproj=True) for t in types]
        else:
            outs = {t: pairs[(family, t)][1] for t in types}
            steps += ref.llava_steps(folder, root / f"work-{family}", outs)
        text_folder = folder
        if family == "llava_next":  # convert_hf_to_gguf.py takes Llava-NeXT's language model saved on its own
            text_folder = ref.language_model_folder(folder, root / "llava_next-lm")
        steps.append(ref.hf_step(text_folder, pairs[(family, "text")][1], "f32"))
    ref.run_steps(steps)
    return pairs


def _fields(reader: gguf.GGUFReader, skip: tuple[str, ...]) -> dict:
    return {k: ([t.name for t in f.types], f.contents()) for k, f in reader.fields.items() if not k.startswith(skip)}


@pytest.mark.parametrize("family, qtype", [(f, t) for f, types in MMPROJ_CASES.items() for t in types])
def test_mmproj_equals_llama_cpp_converter(family, qtype, reference_files):
    ours_path, ref_path = reference_files[(family, qtype)]
    a, b = gguf.GGUFReader(ours_path), gguf.GGUFReader(ref_path)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in tb.items():
        mine = ta[name]
        assert list(mine.shape) == list(t.shape), name
        if family.startswith("llava") and qtype == "f32" and name in LLAVA_F32_IN_F16:
            assert (mine.tensor_type.name, t.tensor_type.name) == ("F32", "F16"), name
            assert np.array_equal(np.asarray(mine.data).astype(np.float16), np.asarray(t.data)), name
            continue
        assert mine.tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(mine.data), np.asarray(t.data)), name
    skip = ("GGUF.", "general.name", "general.size_label")
    assert _fields(a, skip) == _fields(b, skip)


@pytest.mark.parametrize("family", list(MMPROJ_CASES))
def test_language_model_equals_llama_cpp_converter(family, reference_files):
    ours_path, ref_path = reference_files[(family, "text")]
    a, b = gguf.GGUFReader(ours_path), gguf.GGUFReader(ref_path)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ta[name].data), np.asarray(t.data)), name
    skip = ("tokenizer.", "GGUF.", "general.name", "general.size_label")
    fa, fb = _fields(a, skip), _fields(b, skip)
    assert {k: fa.get(k) for k in fb} == fb
    assert all(k.split(".", 1)[1] in EXTRA_KEYS for k in set(fa) - set(fb)), set(fa) - set(fb)
