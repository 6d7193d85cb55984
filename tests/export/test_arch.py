"""Architecture mapping: supported classes, hyper-parameters, RoPE scaling, and refusals with clear errors."""

from __future__ import annotations

import pytest
import torch

from quickloris.export import export_gguf
from quickloris.export.arch import architecture_of, llama3_rope_factors


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, bpe_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                         "Qwen3ForCausalLM; got GPT2LMHeadModel"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert not list(tmp_path.iterdir())


def test_parameters_without_a_gguf_name_are_an_error(tmp_path, helpers, bpe_tokenizer):
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer))
    model.model.layers[0].mlp.register_parameter("scale", torch.nn.Parameter(torch.ones(4)))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.scale' of LlamaForCausalLM has no GGUF tensor name"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert not list(tmp_path.iterdir())


def test_llama3_rope_factors_reproduce_hf_frequencies(helpers):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = helpers.tiny_model(vocab_size=64, hidden=256, heads=4, rope_parameters=params)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = llama3_rope_factors(model.config)
    assert {1.0, 32.0} <= set(factors.tolist()) and len(set(factors.tolist())) > 2  # all three regimes
    torch.testing.assert_close(base / factors, hf_inv_freq.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "RoPE type 'yarn' is not supported by the GGUF export \\(default, linear, llama3\\)"),
    (dict(hidden_act="gelu"), "use SiLU; this config has hidden_act='gelu'"),
])
def test_unsupported_configs_are_rejected(change, message, tmp_path, helpers, bpe_tokenizer):
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer), **change)
    with pytest.raises(ValueError, match=message):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert not list(tmp_path.iterdir())


def test_mistral_runs_as_llama_and_qwen2_keeps_its_rope_layout():
    assert architecture_of("MistralForCausalLM").gguf_arch == "llama"
    assert architecture_of("MistralForCausalLM").permute_qk
    assert architecture_of("Qwen2ForCausalLM").gguf_arch == "qwen2"
    assert not architecture_of("Qwen2ForCausalLM").permute_qk
    assert architecture_of("Qwen3ForCausalLM").gguf_arch == "qwen3"
    assert not architecture_of("Qwen3ForCausalLM").permute_qk
