"""Architecture mapping: the llama.cpp architecture from the config, hyper-parameters, RoPE scaling, and refusals
of what llama.cpp would compute differently, each in one line and before anything is written."""

from __future__ import annotations

import pytest
import torch

from quickloris.export import export_gguf
from quickloris.export.arch import architecture_of, gguf_arch_for, llama3_rope_factors
from tests.export.family_models import family_config, family_model


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, bpe_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(
        ValueError,
        match=r"^GGUF export supports the model types llama, mistral, qwen2, qwen3, "
        r"gemma2, gemma3_text, phi3 \(llama.cpp's llama, qwen2, qwen3, gemma2, "
        r"gemma3, phi3\) and the vision-language models llava, llava_next, qwen2_vl, qwen2_5_vl; "
        r"got model_type 'gpt2'$",
    ):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert not list(tmp_path.iterdir())


def test_parameters_without_a_gguf_name_are_an_error(tmp_path, helpers, bpe_tokenizer):
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer))
    model.model.layers[0].mlp.register_parameter("scale", torch.nn.Parameter(torch.ones(4)))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.scale' has no tensor in llama.cpp's llama architecture"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert not list(tmp_path.iterdir())


def test_llama3_rope_factors_reproduce_hf_frequencies(helpers):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    model = helpers.tiny_model(vocab_size=64, hidden=256, heads=4, rope_parameters=params)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = llama3_rope_factors(model.config)
    assert {1.0, 32.0} <= set(factors.tolist()) and len(set(factors.tolist())) > 2  # all three regimes
    torch.testing.assert_close(base / factors, hf_inv_freq.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            "RoPE type 'yarn' is not supported by the GGUF export of llama models \\(default, linear, llama3\\)",
        ),
        (dict(hidden_act="gelu"), "llama.cpp's llama models use silu / swish; this config has activation 'gelu'"),
    ],
)
def test_unsupported_configs_are_rejected(change, message, tmp_path, helpers, bpe_tokenizer):
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer), **change)
    with pytest.raises(ValueError, match=message):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert not list(tmp_path.iterdir())


def test_the_architecture_comes_from_the_config_not_the_class():
    import transformers

    expected = {
        "LlamaConfig": "llama",
        "MistralConfig": "llama",
        "Qwen2Config": "qwen2",
        "Qwen3Config": "qwen3",
        "Gemma2Config": "gemma2",
        "Gemma3TextConfig": "gemma3",
        "Phi3Config": "phi3",
    }
    for name, arch in expected.items():
        assert gguf_arch_for(getattr(transformers, name)()) == arch
    # a config without model_type: its `architectures`
    assert gguf_arch_for(transformers.PretrainedConfig(architectures=["Phi3ForCausalLM"])) == "phi3"
    with pytest.raises(ValueError, match="got model_type 'gemma3' \\(Gemma3ForConditionalGeneration\\)"):
        gguf_arch_for(transformers.Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]))

    class Renamed(transformers.Qwen2ForCausalLM):  # a subclass (or a wrapper's class name) does not matter
        pass

    assert (
        architecture_of(
            Renamed(
                transformers.Qwen2Config(
                    num_hidden_layers=1,
                    hidden_size=32,
                    intermediate_size=64,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    vocab_size=64,
                )
            )
        ).name
        == "qwen2"
    )


def test_mistral_runs_as_llama_and_the_others_keep_hf_rope_layout():
    import transformers

    q = torch.arange(8.0 * 3).reshape(8, 3)
    cfg = transformers.MistralConfig(num_attention_heads=2, num_key_value_heads=2, hidden_size=8, head_dim=4)
    permuted = architecture_of(cfg).to_gguf_layout("blk.0.attn_q.weight", q, cfg)
    assert permuted[1].tolist() == q[2].tolist()  # row 2i + 1 of a head = row h/2 + i
    for name in ("Qwen2Config", "Qwen3Config", "Gemma2Config", "Gemma3TextConfig", "Phi3Config"):
        cfg = getattr(transformers, name)()
        assert torch.equal(architecture_of(cfg).to_gguf_layout("blk.0.attn_q.weight", q, cfg), q)


V = 64
FAMILY_REFUSALS = [
    (
        "gemma2",
        dict(query_pre_attn_scalar=64),
        r"^llama.cpp's gemma2 scales queries by 1/sqrt\(16\) for this shape; this config has query_pre_attn_scalar=64$",
    ),
    # the 27B shape (62 layers): llama.cpp scales by hidden / heads (16 here), not by head_dim (32)
    (
        "gemma3",
        dict(layers=62, head_dim=32, query_pre_attn_scalar=32),
        r"^llama.cpp's gemma3 scales queries by 1/sqrt\(16\) for this shape; this config has query_pre_attn_scalar=32$",
    ),
    (
        "gemma2",
        dict(attn_logit_softcapping=None),
        r"^llama.cpp's gemma2 always caps attention scores; this config has no attn_logit_softcapping$",
    ),
    (
        "gemma2",
        dict(final_logit_softcapping=None),
        r"^llama.cpp's gemma2 always caps the logits; this config has no final_logit_softcapping$",
    ),
    ("gemma2", dict(attention_bias=True), r"^llama.cpp's gemma2 has no attention biases"),
    ("gemma3", dict(use_bidirectional_attention=True), r"^llama.cpp's gemma3 attention is causal"),
    (
        "gemma2",
        dict(hidden_activation="gelu"),
        r"^llama.cpp's gemma2 models use gelu_pytorch_tanh / gelu_new; this config has activation 'gelu'$",
    ),
    (
        "gemma3",
        dict(
            rope_parameters={
                "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            }
        ),
        r"^llama.cpp's gemma3 runs the sliding layers' RoPE unscaled; this config scales it \('linear'\)$",
    ),
    (
        "gemma3",
        dict(
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
            }
        ),
        r"^RoPE type 'yarn' is not supported by the GGUF export of gemma3 models \(default, linear\)$",
    ),
    ("phi3", dict(hidden_act="gelu"), r"^llama.cpp's phi3 models use silu / swish; this config has activation"),
    (
        "qwen2",
        dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
        r"^RoPE type 'dynamic' is not supported by the GGUF export of qwen2 models \(default, linear\)$",
    ),
]


@pytest.mark.parametrize(
    "kind, change, message", FAMILY_REFUSALS, ids=[f"{k}-{next(iter(c))}" for k, c, _ in FAMILY_REFUSALS]
)
def test_configs_llama_cpp_would_compute_differently_are_refused(kind, change, message, tmp_path, bpe_tokenizer):
    """Each refusal is one line, raised before the file is created."""
    model = family_model(kind, vocab_size=len(bpe_tokenizer), **change)
    with pytest.raises(ValueError, match=message) as err:
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_phi3_longrope_factors_must_fit_the_rotary_dimensions(tmp_path, bpe_tokenizer):
    cfg = family_config(
        "phi3",
        vocab_size=V,
        original_max_position_embeddings=16,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "long_factor": [1.0] * 8,
            "short_factor": [1.0] * 8,
        },
    )
    cfg.rope_parameters["long_factor"] = [1.0] * 7  # as a hand-edited config.json could have it
    with pytest.raises(ValueError, match=r"^LongRoPE long_factor needs 8 values \(one per rotary frequency\), got 7$"):
        architecture_of(cfg).check(cfg)


def test_an_untied_gemma2_head_is_refused(tmp_path, bpe_tokenizer):
    model = family_model("gemma2", vocab_size=len(bpe_tokenizer), tie_word_embeddings=False)
    with pytest.raises(ValueError, match="lm_head differs from its embed_tokens: it is untied"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer)
    assert not list(tmp_path.iterdir())


def test_family_specs_and_export_agree_on_the_gguf_architecture():
    """Two places name llama.cpp's architecture: each family spec (`gguf_arch`, what training reports) and the
    export's table (what the file says). For every registered family's own config they must agree."""
    import transformers

    from quickloris.models.families import registered

    for spec in registered().values():
        cfg = getattr(transformers, spec.causal_lm).config_class()
        if spec.gguf_arch is None:  # a family the export does not write (the vision-language ones): both say so
            with pytest.raises(ValueError, match="GGUF export supports"):
                gguf_arch_for(cfg)
            continue
        assert gguf_arch_for(cfg) == spec.gguf_arch, spec.causal_lm
