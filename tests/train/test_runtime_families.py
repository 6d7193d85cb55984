"""`check_inputs` reads the model family from config.json before any model is loaded: registered families map
--target-modules through their spec (Phi-3's fused layers), other decoder-only models pass to the generic path,
what cannot work is refused naming --model."""

from __future__ import annotations

import pytest

from quickloris.config import ConfigError
from quickloris.data.config import DataConfig
from quickloris.models.loading import ModelSource
from quickloris.models.prepare import QLoRAConfig
from quickloris.train.config import EvalConfig, ModelConfig
from quickloris.train.runtime import check_inputs


def _check(tmp_path, config: dict, targets: list[str] | None = None) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    source = ModelSource("hf", tmp_path, config, None, (tmp_path / "model.safetensors",))
    qlora = QLoRAConfig() if targets is None else QLoRAConfig(target_modules=targets)
    check_inputs(source, ModelConfig(), DataConfig(), qlora, EvalConfig(), None)


def test_check_inputs_by_family(tmp_path):
    for arch in ("Phi3ForCausalLM", "Gemma3ForCausalLM", "Gemma2ForSequenceClassification", "Olmo2ForCausalLM"):
        _check(tmp_path, {"architectures": [arch]})  # default targets: every decoder linear of the family
    _check(tmp_path, {"architectures": ["Phi3ForCausalLM"]}, ["q_proj", "k_proj", "v_proj"])
    _check(tmp_path, {"architectures": ["Olmo2ForCausalLM"]}, ["anything"])  # checked once the model is built
    with pytest.raises(ConfigError) as e:
        _check(tmp_path, {"architectures": ["Phi3ForCausalLM"]}, ["q_proj"])
    assert (e.value.owner, e.value.name) == (QLoRAConfig, "target_modules")
    assert e.value.problem.startswith(
        "names q_proj, but Phi3ForCausalLM computes q_proj,k_proj,v_proj in one fused layer, qkv_proj"
    )
    with pytest.raises(ConfigError, match="names qkv_proj, not a linear layer of this model's decoder"):
        _check(tmp_path, {"architectures": ["LlamaForCausalLM"]}, ["qkv_proj"])
    with pytest.raises(ConfigError) as e:
        _check(tmp_path, {"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True})
    assert (e.value.owner, e.value.name) == (ModelConfig, "model")
    assert "is a T5ForConditionalGeneration: an encoder-decoder model; quickloris supports" in e.value.problem
