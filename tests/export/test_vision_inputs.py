"""`quickloris export gguf` on vision-language model folders: what it writes (model.gguf + model.mmproj.gguf, or the
language model alone with --text-only), LoRA adapters merged into the language model and the vision tower, and the
bad inputs refused in one line before the model is loaded and before anything is written: an unsupported vision
family, an adapter on vision weights the mmproj cannot hold, a processor config that contradicts the model's."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest

from quickloris.cli.main import main
from quickloris.export import gguf_export
from tests.export import vlm_models as V


@pytest.fixture
def vlm_folder(tmp_path, seed):
    """family -> (folder, model, tokenizer) of a saved tiny VLM (made on first use)."""
    made = {}

    def make(family: str):
        if family not in made:
            tok = V.tokenizer(family)
            model = V.model(family, tok)
            made[family] = (V.save(tmp_path / family, family, model, tok), model, tok)
        return made[family]

    return make


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(gguf_export, "_load", lambda *a: pytest.fail("the model was loaded before the check"))


def _export(*args) -> int:
    return main(["export", "gguf", "--quant", "f32", *map(str, args)])


def _adapter(model, folder, targets, **kw):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, **kw)
    )
    peft_model.save_pretrained(folder)
    return peft_model


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


def test_writes_both_files_and_text_only_one(tmp_path, vlm_folder):
    folder, _, _ = vlm_folder("qwen2_5_vl")
    assert _export("--model", folder, "--out", tmp_path / "m.gguf", "--mmproj-quant", "q8_0") == 0
    mm = gguf.GGUFReader(tmp_path / "m.mmproj.gguf")
    assert mm.fields["general.architecture"].contents() == "clip"
    assert {t.tensor_type.name for t in mm.tensors} == {"F32", "F16", "Q8_0"}  # F16: ffn_down's rows of 48
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "qwen2vl"
    assert _export("--model", folder, "--out", tmp_path / "t.gguf", "--text-only") == 0
    assert (tmp_path / "t.gguf").exists() and not (tmp_path / "t.mmproj.gguf").exists()


def test_lora_on_language_model_and_vision_tower_is_merged(tmp_path, vlm_folder):
    """W + (alpha / r) B A in the file, for a language-model linear and for a vision qkv (split in three)."""
    folder, model, _ = vlm_folder("qwen2_vl")
    peft_model = _adapter(model, tmp_path / "adapter", ["q_proj", "qkv"])
    out = tmp_path / "m.gguf"
    assert _export("--model", folder, "--adapter", tmp_path / "adapter", "--merge-base", "original", "--out", out) == 0
    text, vision = _tensors(out), _tensors(tmp_path / "m.mmproj.gguf")
    base = peft_model.get_base_model()

    def merged(module):
        return (
            module.base_layer.weight + 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight
        ).detach()

    q = merged(base.model.language_model.layers[1].self_attn.q_proj)
    np.testing.assert_array_equal(text["blk.1.attn_q.weight"], q.numpy())
    qkv = merged(base.model.visual.blocks[2].attn.qkv)
    for i, part in enumerate("qkv"):
        np.testing.assert_array_equal(vision[f"v.blk.2.attn_{part}.weight"], qkv[i * 32 : (i + 1) * 32].numpy())
    assert not np.array_equal(
        vision["v.blk.2.attn_k.weight"], base.model.visual.blocks[2].attn.qkv.base_layer.weight[32:64].detach().numpy()
    )


def test_unsupported_vision_family_is_one_line(tmp_path, cli_error, no_load):
    from transformers import Gemma3Config

    folder = tmp_path / "gemma3"
    folder.mkdir()
    cfg = Gemma3Config(architectures=["Gemma3ForConditionalGeneration"])
    (folder / "config.json").write_text(cfg.to_json_string())
    (folder / "model.safetensors").write_bytes(b"")  # a weights file: resolve_model accepts the folder
    message = cli_error(["export", "gguf", "--model", folder, "--out", tmp_path / "x.gguf"])
    assert message == (
        "GGUF vision export supports the model types llava, llava_next, qwen2_vl, qwen2_5_vl (Llava 1.5 / NeXT, "
        "Qwen2-VL, Qwen2.5-VL); config.json has model_type 'gemma3' (pass text_only / --text-only for its language "
        "model alone, where its architecture is supported)"
    ), message
    assert list(tmp_path.iterdir()) == [folder]


def test_pixtral_tower_is_an_unsupported_family(tmp_path, cli_error, vlm_folder, no_load):
    folder, _, _ = vlm_folder("llava")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"] = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    message = cli_error(["export", "gguf", "--model", folder, "--out", tmp_path / "x.gguf"])
    assert message.startswith(
        "GGUF vision export of llava supports a CLIP vision tower (Llava 1.5 / NeXT); this model's is 'pixtral'"
    ), message


@pytest.mark.parametrize(
    "family, targets, expected",
    [
        (  # Llava reads the hidden states of vision_feature_layer (-2): the last block is not in the mmproj
            "llava",
            r".*vision_tower.*layers\.2\.self_attn\.q_proj",
            r"the adapter changes model\.vision_tower\.encoder\.layers\.2\.self_attn\.q_proj, which llama\.cpp's llava "
            r"mmproj leaves out \(the HF model's image path does not use it either\): its effect would be lost",
        ),
        (  # a LoRA on the Conv3d patch embedding cannot be folded into the file by the merge
            "qwen2_vl",
            ["proj"],
            r"the adapter's LoRA on model\.visual\.patch_embed\.proj \(a convolution or embedding of the vision "
            r"tower\) cannot be merged into llama\.cpp's qwen2vl mmproj; adapt the vision tower's linear layers only",
        ),
    ],
    ids=["llava-dropped-layer", "qwen2vl-conv"],
)
def test_adapter_the_mmproj_cannot_hold_is_one_line(
    family, targets, expected, tmp_path, vlm_folder, cli_error, no_load
):
    folder, model, _ = vlm_folder(family)
    kw = {"exclude_modules": r".*attn\.proj"} if family == "qwen2_vl" else {}
    _adapter(model, tmp_path / "adapter", targets, **kw)
    message = cli_error(
        ["export", "gguf", "--model", folder, "--adapter", tmp_path / "adapter", "--out", tmp_path / "x.gguf"]
    )
    assert re.fullmatch(expected, message), message
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.mmproj.gguf").exists()


def test_text_only_with_a_vision_adapter_is_one_line(tmp_path, vlm_folder, cli_error, no_load):
    folder, model, _ = vlm_folder("qwen2_5_vl")
    _adapter(model, tmp_path / "adapter", ["qkv", "q_proj"])
    message = cli_error(
        [
            "export",
            "gguf",
            "--model",
            folder,
            "--adapter",
            tmp_path / "adapter",
            "--text-only",
            "--out",
            tmp_path / "x.gguf",
        ]
    )
    assert re.fullmatch(
        r"the adapter changes the vision part \(model\.visual\.blocks\.0\.attn\.qkv\), which a text-only export leaves "
        r"out: export without --text-only to write the mmproj too",
        message,
    ), message


@pytest.mark.parametrize(
    "family, key, value, expected",
    [
        ("qwen2_vl", "patch_size", 16, "patch_size 16 does not match config.json vision_config.patch_size 14"),
        ("qwen2_5_vl", "merge_size", 3, "merge_size 3 does not match config.json vision_config.spatial_merge_size 2"),
        (
            "llava",
            "crop_size",
            {"height": 32, "width": 32},
            "crop_size (32, 32) does not match config.json vision_config.image_size (16, 16)",
        ),
        (
            "llava_next",
            "image_grid_pinpoints",
            [[16, 48]],
            "image_grid_pinpoints [[16, 48]] does not match config.json image_grid_pinpoints "
            "[[16, 32], [32, 16], [32, 32]]",
        ),
        ("llava", "image_mean", [0.5, 0.5], "image_mean must be 3 numbers (one per RGB channel), got [0.5, 0.5]"),
    ],
)
def test_mismatched_processor_config_is_one_line(
    family, key, value, expected, tmp_path, vlm_folder, cli_error, no_load
):
    folder, _, _ = vlm_folder(family)
    path = folder / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    message = cli_error(["export", "gguf", "--model", folder, "--out", tmp_path / "x.gguf"])
    assert message.startswith(f"{path}: {expected}"), message
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.mmproj.gguf").exists()


def test_the_vlm_families_are_listed_once():
    from quickloris.export.archs import VLM_MODEL_TYPES
    from quickloris.export.vlm import VISION_ARCHS

    assert tuple(VISION_ARCHS) == VLM_MODEL_TYPES


def test_a_flat_qwen2_vl_config_exports_the_same(tmp_path, vlm_folder):
    """Qwen2-VL's original config.json keeps the language model's settings at the top level (no ``text_config``,
    M-RoPE as ``rope_scaling: {type: mrope}``): the same model gives the same two files."""
    folder, _, _ = vlm_folder("qwen2_vl")
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in folder.iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    cfg.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    cfg["rope_theta"] = rope["rope_theta"]
    (flat / "config.json").write_text(json.dumps(cfg))
    for src, out in ((folder, tmp_path / "a.gguf"), (flat, tmp_path / "b.gguf")):
        assert _export("--model", src, "--out", out, "--name", "same") == 0
    for a, b in (("a.gguf", "b.gguf"), ("a.mmproj.gguf", "b.mmproj.gguf")):
        assert (tmp_path / a).read_bytes() == (tmp_path / b).read_bytes(), a


@pytest.mark.parametrize(
    "family, over, expected",
    [
        ("llava", dict(vision_feature_select_strategy="full"), "llama.cpp's Llava drops the CLS token"),
        ("llava", dict(projector_hidden_act="relu"), "llama.cpp's Llava projector computes GELU"),
        ("llava", dict(vision_feature_layer=[-1, -3]), "llama.cpp concatenates the layers' hidden states in ascending"),
        ("llava", dict(vision_feature_layer=-5), "is outside the vision tower's 3 layers"),
        ("qwen2_5_vl", dict(vision_config={"window_size": 224}), "attends in windows of 112 pixels"),
        ("qwen2_5_vl", dict(vision_config={"fullatt_block_indexes": [1, 2]}), "attends fully in every n-th block"),
        ("qwen2_vl", dict(vision_config={"spatial_merge_size": 3}), "ViT has 2"),
    ],
)
def test_configs_llama_cpp_computes_differently_are_refused(family, over, expected):
    from quickloris.export.vlm import vision_arch_for

    tok = V.tokenizer(family)
    cfg = V.config(family, tok)
    for key, value in over.items():
        if key == "vision_config":
            for k, v in value.items():
                setattr(cfg.vision_config, k, v)
        else:
            setattr(cfg, key, value)
    with pytest.raises(ValueError, match=re.escape(expected)):
        vision_arch_for(cfg)
