"""Every registered model family, one row each (`tests.tiny.FAMILY_CONFIGS`; adding a family adds a row), on tiny
random-init models of the real architecture:

* the prepared model's logits (LoRA B = 0) equal transformers' own forward (eager attention: the reference with
  every feature, softcaps included) on the same dequantized weights;
* one training step on the fast path (flex attention, chunked loss) gives the loss and LoRA gradients of an fp32
  PEFT model (HF eager attention, HF's loss) holding the same dequantized weights and LoRA matrices;
* the fast path compiles (aot_eager on CPU; one inductor case, slow) with fullgraph and no graph break, and the
  compiled step equals the eager one;
* a packed row (flex with document masks) has the loss and gradients of the same documents as a padded batch;
* PEFT loads the saved adapter onto the dequantized HF model and reproduces the outputs;
* the family's *ForSequenceClassification is prepared too (decoder quantized, score head left alone).

Tolerances: `tests.helpers.reorder_tolerance` - fp32 eps times sqrt(the longest sum) times the number of sums in
sequence, relative to the tensor's scale - the two sides differ only in the order of their floating-point sums.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quickloris.models.adapters import lora_layers  # noqa: E402
from quickloris.models.families import family_of  # noqa: E402
from quickloris.models.prepare import FamilyWarning, QLoRAConfig, prepare_model  # noqa: E402
from quickloris.nn.qlora_linear import QLoRALinear  # noqa: E402
from quickloris.parallel.compile import CompileConfig, compile_model, compile_stats, reset_compile_stats  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_close_rel,
    dequantized_twin,
    lora_grads,
    packed_and_padded,
    peft_twin,
    reorder_tolerance,
)
from tests.tiny import COMMON, FAMILY_CONFIGS, VOCAB, family_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = list(FAMILY_CONFIGS)
R, ALPHA = 4, 8.0
# Longest floating-point sum in these models (hidden 64, intermediate 96, sequences <= 40 tokens, vocab 97) and the
# number of sums one output passes through: per layer q/k/v, scores, probabilities x values, o, gate/up, down (6),
# 2 layers, plus the head; a gradient passes through them twice.
K, DEPTH = max(COMMON["intermediate_size"], VOCAB), 6 * COMMON["num_hidden_layers"] + 1
FWD = reorder_tolerance(torch.float32, K, DEPTH)
BWD = reorder_tolerance(torch.float32, K, 2 * DEPTH)


def _padded_batch(gen: torch.Generator, B: int = 3, S: int = 29):
    ids = torch.randint(3, VOCAB, (B, S), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    mask[2, -S // 2 :] = 0
    ids = ids.masked_fill(mask == 0, COMMON["pad_token_id"])  # classifiers pool the last non-pad token
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask), labels


def _prepare(row: str, **cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(16-bit reference, prepared copy) of a fresh tiny model of `row`."""
    ref = family_model(row)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FamilyWarning)  # Gemma-2 + sdpa -> flex is the documented choice
        model = prepare_model(copy.deepcopy(ref), QLoRAConfig(r=R, lora_alpha=ALPHA, **cfg))
    return ref, model


@pytest.mark.parametrize("row", ROWS)
def test_logits_equal_transformers_on_dequantized_weights(seed, row):
    gen = torch.Generator().manual_seed(seed)
    ref, model = _prepare(row, attention="flex")
    assert family_of(model).name == row.split("_")[0] and all(
        m.r == 0 or not m.lora_B.default.weight.any() for m in model.modules() if isinstance(m, QLoRALinear)
    )
    twin = dequantized_twin(ref, model)
    batch, _ = _padded_batch(gen)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        want = twin(**batch).logits[valid]
        got = {"flex": model(**batch).logits[valid]}
        if family_of(model).attention_softcap(model.config) is None:  # SDPA is refused where it would drop a cap
            from quickloris.models.attention import set_attention

            set_attention(model, "sdpa")
            got["sdpa"] = model(**batch).logits[valid]
    for impl, logits in got.items():
        assert_close_rel(logits, want, FWD, f"{row} {impl}")


@pytest.mark.parametrize("row", ROWS)
def test_training_step_matches_fp32_peft(seed, row):
    gen = torch.Generator().manual_seed(seed)
    ref, model = _prepare(row, attention="flex", init_lora_weights="random")
    peft_model = peft_twin(ref, model, r=R, lora_alpha=ALPHA).train()
    model.train()
    batch, labels = _padded_batch(gen)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    want = peft_model(**batch, labels=labels).loss
    want.backward()
    assert_close_rel(loss.detach(), want.detach(), FWD, f"{row} loss")
    ours, theirs = lora_grads(model), lora_grads(peft_model)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * len(lora_layers(model)) > 0
    for name, g in theirs.items():
        assert_close_rel(ours[name], g, BWD, f"{row} {name}")


def _step(model, batch, labels):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def _compiled_forward_matches_eager(row: str, gen: torch.Generator) -> None:
    """Eval forward of the regionally compiled model (aot_eager): the layers trace flex_attention itself (per-layer
    BlockMasks, the softcap score_mod) with no graph break, and give the eager model's outputs."""
    _, eager = _prepare(row, attention="flex", init_lora_weights="random")
    compiled = compile_model(copy.deepcopy(eager), CompileConfig(backend="aot_eager", loss=False))
    reset_compile_stats()
    for S in (29, 37):
        batch, _ = _padded_batch(gen, S=S)
        valid = batch["attention_mask"].bool()
        with torch.no_grad():
            assert_close_rel(compiled(**batch).logits[valid], eager(**batch).logits[valid], FWD, f"{row} S={S}")
    assert compile_stats()["graph_breaks"] == 0


def test_gemma2_compiled_flex_with_softcap_and_window_masks(seed):
    """The fast suite's compile case: Gemma-2 (a BlockMask per layer type, the softcap score_mod)."""
    _compiled_forward_matches_eager("gemma2", torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_fast_path_compiles_without_graph_breaks(seed, row):
    """Regional compile (aot_eager on CPU) of the flex + chunked-loss model: a training step (CPU: flex's dense
    fallback inside the layers) with fullgraph layers, no graph break, the loss and gradients of the eager model at
    two lengths (dynamic shapes); then the eval forward through flex_attention itself."""
    gen = torch.Generator().manual_seed(seed)
    _, eager = _prepare(row, attention="flex", init_lora_weights="random")
    compiled = compile_model(copy.deepcopy(eager).train(), CompileConfig(backend="aot_eager"))
    eager.train()
    reset_compile_stats()
    for S in (29, 37):
        batch, labels = _padded_batch(gen, S=S)
        got, want = _step(compiled, batch, labels), _step(eager, batch, labels)
        assert_close_rel(got[0], want[0], FWD, f"{row} loss")
        for name, g in want[1].items():
            assert_close_rel(got[1][name], g, BWD, f"{row} {name}")
    stats = compile_stats()
    assert stats["graph_breaks"] == 0 and stats["unique_graphs"] >= 1, stats
    _compiled_forward_matches_eager(row, gen)


@pytest.mark.parametrize("row", ROWS)
def test_packed_row_equals_padded_batch(seed, row):
    """Flex with document masks: three documents packed in one row train like the same three padded (sliding
    windows and softcaps apply within each document)."""
    gen = torch.Generator().manual_seed(seed)
    _, model = _prepare(row, attention="flex", init_lora_weights="random")
    model.train()
    packed, padded = packed_and_padded([17, 9, 14], VOCAB, gen=gen)
    got = _step(model, packed, packed.pop("labels"))
    want = _step(model, padded, padded.pop("labels"))
    assert_close_rel(got[0], want[0], FWD, f"{row} loss")
    for name, g in want[1].items():
        assert_close_rel(got[1][name], g, BWD, f"{row} {name}")


@pytest.mark.parametrize("row", ROWS)
def test_peft_loads_the_saved_adapter(seed, row, tmp_path):
    gen = torch.Generator().manual_seed(seed)
    ref, model = _prepare(row, init_lora_weights="random")
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(dequantized_twin(ref, model), tmp_path / "adapter").eval()
    assert sorted(loaded.peft_config["default"].target_modules) == sorted(family_of(model).default_targets())
    batch, _ = _padded_batch(gen)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        assert_close_rel(model(**batch).logits[valid], loaded(**batch).logits[valid], FWD, row)


@pytest.mark.parametrize("row", ROWS)
def test_sequence_classifier_is_prepared(seed, row):
    """The family's *ForSequenceClassification: decoder linears NF4 + LoRA, the score head left alone (16-bit,
    not trained here: the classification task makes it trainable), its own loss, outputs those of HF."""
    gen = torch.Generator().manual_seed(seed)
    ref = family_model(row, classification=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FamilyWarning)
        model = prepare_model(copy.deepcopy(ref), QLoRAConfig(r=R, lora_alpha=ALPHA))
    assert type(model).__name__ == FAMILY_CONFIGS[row][2] and family_of(model) is family_of(family_model(row))
    assert type(model.score) is torch.nn.Linear and torch.equal(model.score.weight, ref.score.weight)
    assert len(lora_layers(model)) == len(family_of(model).linears) * COMMON["num_hidden_layers"]
    batch, _ = _padded_batch(gen)
    labels = torch.randint(0, 3, (3,), generator=gen)
    with torch.no_grad():
        got = model(**batch, labels=labels)
        want = dequantized_twin(ref, model)(**batch, labels=labels)
    assert_close_rel(got.logits, want.logits, FWD, row)
    assert_close_rel(got.loss, want.loss, FWD, row)


@pytest.mark.slow
def test_inductor_compiles_gemma2_flex_softcap_step(seed):
    """The one inductor case: Gemma-2 (per-layer windows, attention + final softcaps) compiled by inductor."""
    gen = torch.Generator().manual_seed(seed)
    _, eager = _prepare("gemma2", attention="flex", init_lora_weights="random")
    compiled = compile_model(copy.deepcopy(eager).train(), CompileConfig(backend="inductor"))
    eager.train()
    reset_compile_stats()
    batch, labels = _padded_batch(gen)
    got, want = _step(compiled, batch, labels), _step(eager, batch, labels)
    assert compile_stats()["graph_breaks"] == 0
    assert_close_rel(got[0], want[0], FWD, "loss")
    for name, g in want[1].items():  # inductor fuses and reorders more: 4x the reordered sums
        assert_close_rel(got[1][name], g, 4 * BWD, name)


@pytest.mark.parametrize("row", ROWS)
def test_spec_matches_the_model(row):
    """What the spec declares is what the transformers model has: classes, decoder-layer class and place, linear
    names, q/k norms, norm kind, embedding scale, tied default, softcap attributes, layer types, model_type."""
    model = family_model(row)
    spec = family_of(model)
    cfg = model.config
    assert spec.registered and spec.fast_path and spec.gguf_arch
    assert type(model).__name__ == spec.causal_lm and hasattr(transformers, spec.sequence_classification)
    assert family_of(cfg) is spec and family_of(cfg.to_dict()) is spec
    assert family_of({"architectures": [spec.causal_lm]}) is spec
    layers = spec.layers_of(model)
    assert len(layers) == cfg.num_hidden_layers and {type(x).__name__ for x in layers} == {spec.decoder_layer}
    linears = {n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(spec.linears) and set(spec.fused) <= linears
    attn = layers[0].self_attn
    assert hasattr(attn, "q_norm") == spec.attention.qk_norm
    assert not spec.attention.sinks and not hasattr(attn, "sinks")
    norm = layers[0].input_layernorm
    x = torch.randn(3, cfg.hidden_size)
    eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
    with torch.no_grad():
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        w = norm.weight
        expected = unit * (1 + w) if spec.norm == "rms_one_plus_fp32" else unit * w
        torch.testing.assert_close(norm(x), expected)
    scale = getattr(model.model.embed_tokens, "scalar_embed_scale", 1.0)
    assert scale == (cfg.hidden_size**0.5 if spec.embedding_scale == "sqrt_hidden" else 1.0)
    assert type(cfg)().tie_word_embeddings == spec.tied_embeddings
    for attr in (spec.final_logit_softcap, spec.attention.logit_softcap):
        assert attr is None or hasattr(cfg, attr)
    assert spec.logit_softcap(cfg) == getattr(cfg, "final_logit_softcapping", None)
    assert (spec.attention.sliding_window == "per_layer") == (getattr(cfg, "layer_types", None) is not None)
    windows = spec.windows(cfg)
    if spec.attention.sliding_window == "per_layer":
        assert set(windows) == set(cfg.layer_types)
        assert all((w is None) == (t == "full_attention") or cfg.sliding_window is None for t, w in windows.items())
    else:
        assert windows == {None: cfg.sliding_window if spec.attention.sliding_window == "model" else None}
    assert cfg.model_type in spec.model_types


@pytest.mark.gpu
@pytest.mark.parametrize("row", ROWS)
def test_gpu_compiled_flex_training_matches_eager_attention(seed, row):
    """On a GPU the fast path is the real thing: inductor-compiled layers with the FlexAttention kernel (forward and
    backward: per-layer-type BlockMasks, the softcap score_mod) and the compiled loss, packed rows of several
    lengths; its losses and LoRA gradients follow the same model on HF's eager attention, with no graph break. In
    float32 (bf16 is the learning tests' and the benchmarks'): the two differ by the order of their sums, ~u * sqrt(S)
    * depth < 1e-5 relative (u = 6e-8); bounds 1e-4 on the loss and 1e-3 on each gradient's norm-relative error are
    far above that and far below the O(1) a wrong window, softcap or derivative makes (bf16 noise reached ~6 %)."""
    from quickloris.parallel.compose import CheckpointConfig, build_training_model

    dense = family_model(row).to("cuda")
    gen = torch.Generator().manual_seed(seed)
    batches = [packed_and_padded(lens, VOCAB, gen=gen)[0] for lens in ([150, 90, 61], [700], [129, 300, 40])]
    out = {}
    for impl, compile_cfg in (("eager", None), ("flex", CompileConfig())):
        torch.manual_seed(seed)
        model = build_training_model(
            copy.deepcopy(dense),
            QLoRAConfig(r=R, lora_alpha=ALPHA, attention=impl, init_lora_weights="random"),
            checkpointing=CheckpointConfig(),
            compile=compile_cfg,
        )
        reset_compile_stats()
        steps = []
        for packed in batches:
            batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}
            steps.append(_step(model, batch, batch.pop("labels")))
        out[impl] = steps
        if compile_cfg is not None:
            assert compile_stats()["graph_breaks"] == 0
    for (loss, grads), (want, want_grads) in zip(out["flex"], out["eager"]):
        assert float(loss) == pytest.approx(float(want), rel=1e-4)
        for name, g in want_grads.items():
            err = float((grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12))
            assert err < 1e-3, (row, name, err)
