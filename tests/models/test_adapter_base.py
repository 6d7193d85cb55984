"""`quickloris.models.adapter_base`: the NF4 settings of the run that wrote an adapter, and whether an adapter fits
a model (from its config.json alone), with one-line errors naming the options."""

from __future__ import annotations

import json

import pytest
import torch

from quickloris.models import adapter_base as AB
from tests.train.tiny import save_tiny_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama folder (hidden 48, intermediate 96, 2 layers) and a quickloris adapter for it."""
    from quickloris.models.loading import load_model, resolve_model
    from quickloris.models.prepare import QLoRAConfig, prepare_model

    d = tmp_path_factory.mktemp("fit")
    save_tiny_llama(d / "model")
    model = prepare_model(load_model(resolve_model(str(d / "model"))), QLoRAConfig(r=4, chunked_loss=False))
    model.save_pretrained(d / "run" / "adapter")
    return d


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_shapes_from_config_alone_equal_the_loaded_model(folders):
    from quickloris.models.loading import load_model, resolve_model

    shapes = AB.folder_parameter_shapes(folders / "model")
    assert shapes == AB.model_parameter_shapes(load_model(resolve_model(str(folders / "model"))))
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (48, 96)


def test_matching_adapter_passes(folders):
    AB.check_adapter_fits(folders / "run" / "adapter", AB.folder_parameter_shapes(folders / "model"), model="m")


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(intermediate_size=64),
            r"model\.layers\.0\.mlp\.down_proj takes 64 inputs, but the adapter's lora_A is "
            r"\[4, 96\]",
        ),
        (
            dict(num_hidden_layers=1),
            r"the adapter has LoRA weights for model\.layers\.1\.\S+, which the model does not "
            r"have \(the model has 1 decoder layers\)",
        ),
        (
            dict(hidden_size=64, num_attention_heads=4),
            r"model\.layers\.0\.mlp\.down_proj has 64 outputs, but the "
            r"adapter's lora_B is \[48, 4\]",
        ),
    ],
)
def test_mismatch_is_one_line_naming_the_options(folders, tmp_path, change, match):
    other = _edit_config(folders / "model", tmp_path / "other", **change)
    with pytest.raises(ValueError, match=rf"^--adapter \S+adapter does not fit --model \S+other: {match}$"):
        AB.check_adapter_fits(folders / "run" / "adapter", AB.folder_parameter_shapes(other), model=str(other))


def test_replaced_weights_are_checked(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((folders / "run" / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(folders / "run" / "adapter" / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(7, 48)
    save_file(tensors, adapter / "adapter_model.safetensors")
    shapes = AB.folder_parameter_shapes(folders / "model")
    with pytest.raises(ValueError, match=r"the adapter's lm_head\.weight is \[7, 48\], the model's \[\d+, 48\]$"):
        AB.check_adapter_fits(adapter, shapes, model="m")


def test_nf4_settings_from_the_run_config(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-000010").mkdir(parents=True)
    (tmp_path / "run" / "adapter").mkdir()
    assert AB.nf4_base(tmp_path / "run" / "adapter") == AB.NF4Base()  # no config: what eval builds on a CPU
    assert "no run config" in AB.NF4Base().describe()
    (tmp_path / "run" / "config.json").write_text(
        json.dumps(
            {
                "qlora": {"blocksize": 128, "double_quant": False},
                "resolved": {"device": "cuda:1", "dtype": "torch.float16"},
            }
        )
    )
    for folder in ("adapter", "checkpoints/step-000010"):
        base = AB.nf4_base(tmp_path / "run" / folder)
        assert (base.blocksize, base.double_quant, base.rounding, base.torch_dtype) == (
            128,
            False,
            "bnb-cuda",
            torch.float16,
        )
        assert base.origin == str(tmp_path / "run" / "config.json")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"qlora": {}, "resolved": {"dtype": "torch.int8"}}))
    with pytest.raises(ValueError, match=r"config\.json: unreadable NF4 settings of the run"):
        AB.nf4_base(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert AB.run_config(tmp_path / "run" / "adapter") is None  # a model's config.json is not a run's
