"""What the family specs change in how a model is prepared: Gemma's softcaps and windows (visible at the tiny
test size, SDPA refused where it would drop a cap), Phi-3's fused LoRA targets, the generic path for unregistered
decoder-only models (one warning line, no fast path, still equal to HF + PEFT), and the one-line refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quickloris.config import ConfigError  # noqa: E402
from quickloris.models import surgery  # noqa: E402
from quickloris.models.adapters import lora_layers  # noqa: E402
from quickloris.models.attention import set_attention  # noqa: E402
from quickloris.models.chunked_loss import is_chunked_loss_enabled  # noqa: E402
from quickloris.models.families import decoder_layers, family_of, registered  # noqa: E402
from quickloris.models.prepare import (  # noqa: E402
    DEFAULT_TARGETS,
    FamilyWarning,
    QLoRAConfig,
    prepare_model,
    resolve_targets,  # noqa: E402
)
from quickloris.parallel.compile import CompileConfig, compile_config, compile_model  # noqa: E402
from tests.helpers import assert_close_rel, lora_grads, peft_twin  # noqa: E402
from tests.models.test_families import BWD, FWD, _padded_batch  # noqa: E402
from tests.tiny import GENERIC_CONFIGS, family_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize(
    "row,change",
    [
        ("gemma2", dict(attn_logit_softcapping=None)),
        ("gemma2", dict(final_logit_softcapping=None)),
        ("gemma2", dict(sliding_window=512)),
        ("gemma3", dict(sliding_window=512)),
        ("qwen2_swa", dict(sliding_window=512)),
        ("mistral", dict(sliding_window=None)),
        ("phi3", dict(sliding_window=None)),
    ],
)
def test_each_family_feature_changes_the_tiny_model(seed, row, change):
    """The tiny configs make softcaps and windows matter: without the feature the logits move far beyond the
    tolerance the family tests use (so those tests would see a backend that drops it)."""
    gen = torch.Generator().manual_seed(seed)
    model = family_model(row)
    other = copy.deepcopy(model)
    for k, v in change.items():
        setattr(other.config, k, v)
        for layer in decoder_layers(other):
            if k == "sliding_window" and getattr(layer.self_attn, "sliding_window", None) is not None:
                layer.self_attn.sliding_window = v
            if k == "attn_logit_softcapping":
                layer.self_attn.attn_logit_softcapping = v
    batch, _ = _padded_batch(gen, S=37)
    a, b = _logits(model, batch), _logits(other, batch)
    assert float((a - b).abs().max()) > 1e3 * FWD * float(a.abs().max())


def test_gemma_softcaps(seed):
    g2, g3 = family_model("gemma2"), family_model("gemma3")
    spec2, spec3 = family_of(g2), family_of(g3)
    assert (spec2.attention_softcap(g2.config), spec2.logit_softcap(g2.config)) == (2.5, 4.0)
    assert spec3.attention_softcap(g3.config) is None and spec3.logit_softcap(g3.config) is None  # Gemma-3: none
    # Gemma-3's attention ignores its config's attn_logit_softcapping: HF's own outputs do not change with it
    gen = torch.Generator().manual_seed(seed)
    batch, _ = _padded_batch(gen)
    capped = copy.deepcopy(g3)
    capped.config.attn_logit_softcapping = 0.1
    torch.testing.assert_close(_logits(capped, batch), _logits(g3, batch), rtol=0, atol=0)
    with pytest.raises(
        ValueError,
        match=r"Gemma2ForCausalLM caps attention scores \(attn_logit_softcapping=2.5\) "
        "and SDPA cannot: use attention='flex' or 'eager'",
    ):
        set_attention(g2, "sdpa")
    with pytest.warns(FamilyWarning, match="attn_logit_softcapping=2.5, which SDPA cannot apply: attention='flex'"):
        prepared = prepare_model(g2, QLoRAConfig(r=2, attention="sdpa"))
    assert prepared.config._attn_implementation == "quickloris_flex"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Gemma-3 takes SDPA without a word
        prepare_model(g3, QLoRAConfig(r=2, attention="sdpa"))


def test_fused_targets_map_onto_phi3_layers():
    spec = registered()["phi3"]
    assert resolve_targets(spec, DEFAULT_TARGETS) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert resolve_targets(spec, ["v_proj", "k_proj", "q_proj", "down_proj"]) == ["qkv_proj", "down_proj"]
    assert resolve_targets(spec, ["gate_proj", "up_proj"]) == ["gate_up_proj"]
    assert resolve_targets(spec, ["qkv_proj"]) == ["qkv_proj"] and resolve_targets(spec, ["all-linear"]) == [
        "all-linear"
    ]
    with pytest.raises(ConfigError) as e:
        resolve_targets(spec, ["q_proj", "o_proj"])
    assert str(e.value) == (
        "QLoRAConfig.target_modules names q_proj, but Phi3ForCausalLM computes q_proj,k_proj,v_proj"
        " in one fused layer, qkv_proj (LoRA adapts the fused weight): name qkv_proj instead"
    )
    with pytest.raises(ConfigError, match="names up_proj, but Phi3ForCausalLM computes gate_proj,up_proj"):
        resolve_targets(spec, ["up_proj"])
    with pytest.raises(
        ConfigError,
        match="names c_attn, not a linear layer of this model's decoder "
        r"\(qkv_proj,o_proj,gate_up_proj,down_proj, or all-linear\)",
    ):
        resolve_targets(spec, ["c_attn"])
    model = prepare_model(family_model("phi3"), QLoRAConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_layers(model)) == ["qkv_proj", "qkv_proj"]
    with pytest.raises(ConfigError, match="names q_proj, but Phi3ForCausalLM"):
        prepare_model(family_model("phi3"), QLoRAConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("row", list(GENERIC_CONFIGS))
def test_generic_path(seed, row):
    """An unregistered decoder-only family: one warning line, NF4 + LoRA on its decoder linears, SDPA (flex asked:
    SDPA), no regional compile, and the logits and training step of HF + fp32 PEFT on the dequantized weights."""
    gen = torch.Generator().manual_seed(seed)
    ref = family_model(row)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare_model(
            copy.deepcopy(ref), QLoRAConfig(r=4, lora_alpha=8, attention="flex", init_lora_weights="random")
        )
    mine = [w for w in caught if w.category is FamilyWarning]
    lines = [str(w.message) for w in mine]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    shown = warnings.formatwarning(mine[0].message, FamilyWarning, mine[0].filename, mine[0].lineno, mine[0].line)
    assert shown == f"quickloris:0: FamilyWarning: {lines[0]}\n"  # what a terminal shows: one line
    assert (
        lines[0].startswith(f"{type(ref).__name__}: not a registered family: generic path")
        and "the fast path (regional compile, flex attention, compiled loss) is off" in lines[0]
    )
    spec = family_of(model)
    assert not spec.fast_path and not spec.registered and model.config._attn_implementation == "sdpa"
    assert len(lora_layers(model)) == len(spec.linears) * ref.config.num_hidden_layers
    # Granite divides its logits by logits_scaling after the head: the chunked loss cannot, HF's loss stays
    assert is_chunked_loss_enabled(model) == (row != "granite")
    assert ("its own loss" in lines[0]) == (row == "granite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prepare_model's line said it: no second warning
        assert compile_model(model, CompileConfig(backend="aot_eager")) is model and compile_config(model) is None
    assert not any(e.step == "compile" for e in surgery.edits(model).log)
    batch, labels = _padded_batch(gen)
    pm = peft_twin(ref, model, r=4, lora_alpha=8)
    assert_close_rel(_logits(model.eval(), batch), _logits(pm.eval(), batch), FWD, "logits")
    model.train(), pm.train()
    loss, want = model(**batch, labels=labels).loss, pm(**batch, labels=labels).loss
    loss.backward(), want.backward()
    assert_close_rel(loss.detach(), want.detach(), FWD, "loss")
    ours, theirs = lora_grads(model), lora_grads(pm)
    assert ours.keys() == theirs.keys() and ours
    for name, g in theirs.items():
        assert_close_rel(ours[name], g, BWD, name)


def test_refused_in_one_line():
    def tiny(cls, cfg_cls, **kw):
        return getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw))

    cases = [
        (
            tiny("GPT2LMHeadModel", "GPT2Config", n_layer=1, n_embd=32, n_head=2, vocab_size=97),
            "GPT2LMHeadModel cannot be trained: it is not a decoder-only \\*ForCausalLM",
        ),
        (
            tiny(
                "T5ForConditionalGeneration",
                "T5Config",
                num_layers=1,
                d_model=32,
                d_ff=64,
                num_heads=2,
                d_kv=16,
                vocab_size=97,
            ),
            "T5ForConditionalGeneration cannot be trained: it is an encoder-decoder model",
        ),
        (
            tiny(
                "MixtralForCausalLM",
                "MixtralConfig",
                vocab_size=97,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=2,
            ),
            "MixtralForCausalLM cannot be trained: model.layers.0.mlp.gate.weight is a 2-D parameter of "
            "MixtralTopKRouter, not an nn.Linear weight",
        ),
    ]
    olmo = family_model("olmo2")
    olmo.config.num_hidden_layers = 5  # its 2 layers no longer look like the decoder
    cases.append((olmo, r"Olmo2ForCausalLM cannot be trained: no decoder layers found \(a ModuleList of 5"))
    for model, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            prepare_model(model)
        assert "\n" not in str(e.value)
    llama = family_model("llama")
    llama.model.layers = torch.nn.ModuleList()
    with pytest.raises(TypeError, match="LlamaForCausalLM has no decoder layers at model.model.layers"):
        prepare_model(llama)
    for cfg in (
        {"architectures": ["BertForMaskedLM"]},
        {"architectures": ["BartForConditionalGeneration"], "is_encoder_decoder": True},
    ):
        with pytest.raises(ValueError, match="quickloris supports Gemma2ForCausalLM"):
            family_of(cfg)
    assert family_of({"architectures": ["Olmo2ForCausalLM"]}).name == "generic"
    assert family_of({"model_type": "gemma3_text"}).causal_lm == "Gemma3ForCausalLM"


def test_family_survives_fsdp_renaming_and_peft_wrapping():
    """FSDP2 renames a sharded module's class (FSDP<Class>, a subclass); PEFT wraps the model: the family is the
    same, decoder_layers finds the same layers."""
    model = family_model("phi3")
    renamed = type("FSDPPhi3ForCausalLM", (type(model),), {})
    model.__class__ = renamed
    assert family_of(model).name == "phi3" and decoder_layers(model) is model.model.layers
    pm = peft.get_peft_model(family_model("gemma3"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert family_of(pm).name == "gemma3" and decoder_layers(pm) is pm.get_base_model().model.layers


@pytest.mark.slow  # transformers compiles its flex mask builder for each new cache length (~45 s on 2 cores)
def test_gemma2_cached_generation_with_flex_matches_transformers(seed):
    """Generation (KV cache: transformers' own flex masks, sliding layers keeping their window of keys) with
    quickloris' flex attention and softcap gives HF eager's greedy tokens, past the sliding window."""
    from tests.helpers import dequantized_twin

    ref = family_model("gemma2")
    model = prepare_model(copy.deepcopy(ref), QLoRAConfig(r=2, attention="flex"))
    twin = dequantized_twin(ref, model)
    ids = torch.randint(3, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        want = twin.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(got, want)
