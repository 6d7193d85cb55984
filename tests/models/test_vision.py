"""Vision-language models prepared by quickloris, one row per family (`tests.vlm_tiny.VLM_ROWS`), on tiny random-init
models of the real architecture with images drawn by PIL:

* the family is found from the model and from its config; the decoder layers are the language model's;
* the prepared model's logits (LoRA B = 0) equal transformers' own forward (eager attention) on the same dequantized
  weights, for a batch mixing rows with one or two images and a text-only row, with SDPA and with flex (where the
  family has it); Mllama's text-only row in a mixed batch equals transformers' text-only forward of that row (the
  cross-attention layers add nothing), its image rows transformers' forward of the image rows;
* one training step (loss and LoRA gradients, fp32) equals a PEFT model's (HF eager attention, HF's loss) holding
  the same dequantized weights and LoRA matrices; vision parameters get no gradient (frozen), or with
  ``train_vision`` LoRA gradients on the vision side too.

Tolerance: `tests.helpers.reorder_tolerance` - fp32 eps times sqrt(the longest sum) times the sums in sequence - the
two sides differ only in the order of their floating-point sums (quickloris' NF4 matmul / SDPA / flex vs
transformers' linear / eager attention); the vision towers are the same modules running the same code.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quickloris.data.vision import collate_vision, read_vision_jsonl, tokenize_vision_records  # noqa: E402
from quickloris.models.families import decoder_layers, family_of  # noqa: E402
from quickloris.models.prepare import FamilyWarning, QLoRAConfig, prepare_model  # noqa: E402
from quickloris.models.vision import vision_trainable  # noqa: E402
from tests.helpers import assert_close_rel, dequantized_twin, lora_grads, reorder_tolerance  # noqa: E402
from tests.vlm_tiny import TEXT, VLM_ROWS, draw, vlm_model, vlm_processing, vlm_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
R, ALPHA = 4, 8.0
K = max(TEXT["intermediate_size"], TEXT["vocab_size"])


def _bounds(model) -> tuple[float, float]:
    depth = 6 * len(decoder_layers(model)) + 1
    return reorder_tolerance(torch.float32, K, depth), reorder_tolerance(torch.float32, K, 2 * depth)


def write_data(tmp_path, seed: int) -> list:
    """Three rows: one image, text only, two images (files under images/, referenced relative to the JSONL)."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(3):
        draw(seed + i).save(tmp_path / "images" / f"{i}.png")
    img = lambda i: {"type": "image", "image": f"images/{i}.png"}  # noqa: E731
    rows = [
        [
            {"role": "user", "content": [img(0), {"type": "text", "text": "Add 1 2"}]},
            {"role": "assistant", "content": "3"},
        ],
        [{"role": "user", "content": "Reverse 123"}, {"role": "assistant", "content": "321"}],
        [
            {"role": "user", "content": [{"type": "text", "text": "two"}, img(1), img(2)]},
            {"role": "assistant", "content": "1 2"},
        ],
    ]
    path = tmp_path / "vlm.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in rows) + "\n")
    return read_vision_jsonl(path)


def _prepare(row: str, **cfg):
    tok = vlm_tokenizer(row)
    ref = vlm_model(row, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FamilyWarning)  # Mllama + flex -> sdpa is the documented choice
        model = prepare_model(copy.deepcopy(ref), QLoRAConfig(r=R, lora_alpha=ALPHA, **cfg))
    return tok, ref, model


def _hf_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "image_rows")}


@pytest.mark.parametrize("row", VLM_ROWS)
def test_family_and_language_layers(row):
    tok = vlm_tokenizer(row)
    model = vlm_model(row, tok)
    spec = family_of(model)
    assert spec.name == {"pixtral": "llava"}.get(row, row) and family_of(model.config.to_dict()) is spec
    assert decoder_layers(model) is model.model.language_model.layers
    assert set(spec.vision_parts(model)) and all(p.startswith("model.") for p in spec.vision_parts(model))


@pytest.mark.parametrize("row", VLM_ROWS)
def test_logits_equal_transformers_on_dequantized_weights(tmp_path, seed, row):
    records = write_data(tmp_path, seed)
    tok, ref, model = _prepare(row, attention="sdpa")
    proc = vlm_processing(row, tok, ref.config)
    examples, _ = tokenize_vision_records(proc, records, max_seq_len=512)
    batch = collate_vision(proc, examples, packing=False, pad_token_id=0)
    twin = dequantized_twin(ref, model)
    fwd, _ = _bounds(model)
    valid = batch["attention_mask"].bool()
    impls = ["sdpa"] + (["flex"] if family_of(model).flex else [])
    from quickloris.models.attention import set_attention

    for impl in impls:
        set_attention(model, impl)
        with torch.no_grad():
            got = model(**_hf_inputs(batch) | ({"image_rows": batch["image_rows"]} if "image_rows" in batch else {}))
        got = got.logits
        if row != "mllama":
            with torch.no_grad():
                want = twin(**_hf_inputs(batch)).logits
            assert_close_rel(got[valid], want[valid], fwd, f"{row} {impl}")
            continue
        # Mllama: transformers runs the tower on every row (padding images for a text row); compare rows with
        # images against its forward of those rows, the text row against its text-only forward.
        image_rows, text_rows = [0, 2], [1]
        with torch.no_grad():
            sub = collate_vision(proc, [examples[i] for i in image_rows], packing=False, pad_token_id=0)
            want_img = twin(**_hf_inputs(sub)).logits
            sub_t = collate_vision(proc, [examples[i] for i in text_rows], packing=False, pad_token_id=0)
            want_txt = twin(**_hf_inputs(sub_t)).logits
        for b, want, sb in [(0, want_img, 0), (2, want_img, 1), (1, want_txt, 0)]:
            n = int(batch["attention_mask"][b].sum())
            assert_close_rel(got[b, :n], want[sb, :n], fwd, f"{row} {impl} row {b}")


def _peft_twin(ref, model, targets_regex):
    from quickloris.models.adapters import lora_layers

    pm = peft.get_peft_model(
        dequantized_twin(ref, model),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets_regex, lora_dropout=0.0),
    )
    for name, mod in lora_layers(model).items():
        theirs = pm.base_model.model.get_submodule(name)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(mod.lora_A.default.weight)
            theirs.lora_B["default"].weight.copy_(mod.lora_B.default.weight)
    return pm


# train_vision: one row per kind of vision tower (Qwen's, CLIP's, Mllama's tiled one)
@pytest.mark.parametrize(
    "row,train_vision",
    [(r, False) for r in VLM_ROWS] + [(r, True) for r in ("qwen2_vl", "llava", "mllama")],
)
def test_training_step_matches_fp32_peft(tmp_path, seed, row, train_vision):
    records = write_data(tmp_path, seed)
    attention = "flex" if row != "mllama" else "sdpa"
    tok, ref, model = _prepare(row, attention=attention, init_lora_weights="random", train_vision=train_vision)
    proc = vlm_processing(row, tok, ref.config)
    examples, _ = tokenize_vision_records(proc, records, max_seq_len=512)
    keep = [0, 2] if row == "mllama" else [0, 1, 2]  # Mllama: transformers' side needs images on every row
    batch = collate_vision(proc, [examples[i] for i in keep], packing=False, pad_token_id=0)
    # What should be adapted, read off the 16-bit reference: every linear of the language model's decoder layers
    # (and with train_vision every linear of the vision tower and projector), nothing else.
    vision_roots = tuple(family_of(ref).vision_parts(ref)) if train_vision else ()
    expected = {
        n
        for n, m in ref.named_modules()
        if type(m) is torch.nn.Linear and (".language_model.layers." in n or n.startswith(vision_roots))
    }
    from quickloris.models.adapters import lora_layers

    assert set(lora_layers(model)) == expected
    pm = _peft_twin(ref, model, "^(" + "|".join(re.escape(n) for n in sorted(expected)) + ")$").train()
    model.train()
    loss = model(
        **_hf_inputs(batch) | {k: batch[k] for k in ("image_rows",) if k in batch}, labels=batch["labels"]
    ).loss
    loss.backward()
    want = pm(**_hf_inputs(batch), labels=batch["labels"]).loss
    want.backward()
    fwd, bwd = _bounds(model)
    assert_close_rel(loss.detach(), want.detach(), fwd, f"{row} loss")
    ours, theirs = lora_grads(model), lora_grads(pm)
    assert ours.keys() == theirs.keys() and ours
    assert any(".vision" in n or "visual" in n or "projector" in n for n in ours) == train_vision
    for name, g in theirs.items():
        assert_close_rel(ours[name], g, bwd, f"{row} {name}")
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and not p.requires_grad]
    assert not frozen and bool(vision_trainable(model)) == train_vision


@pytest.mark.parametrize("attention", ["flex", "sdpa"])
@pytest.mark.parametrize("row", [r for r in VLM_ROWS if r != "mllama"])
def test_packed_equals_padded(tmp_path, seed, row, attention):
    """Padding-free packing of mixed rows (text-only and image documents in one row, position ids restarting per
    document - Qwen's 3-D mRoPE ids too - read as document boundaries by flex's block-diagonal BlockMask and by
    transformers' SDPA masks) gives the padded batch's loss and LoRA gradients (fp32)."""
    records = write_data(tmp_path, seed)
    tok, ref, model = _prepare(row, attention=attention, init_lora_weights="random")
    proc = vlm_processing(row, tok, ref.config)
    examples, _ = tokenize_vision_records(proc, records, max_seq_len=512)
    model.train()
    grads, losses = [], []
    for packing in (False, True):
        batch = collate_vision(proc, examples, packing=packing, pad_token_id=0)
        model.zero_grad(set_to_none=True)
        loss = model(**_hf_inputs(batch), labels=batch["labels"]).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(lora_grads(model))
    if row in ("qwen2_vl", "qwen2_5_vl"):
        assert batch["position_ids"].shape == (4, 1, sum(map(len, examples)))
    fwd, bwd = _bounds(model)
    assert_close_rel(losses[1], losses[0], fwd, f"{row} {attention} loss")
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert_close_rel(grads[1][name], g, bwd, f"{row} {attention} {name}")


def test_mllama_refuses_packing(tmp_path, seed):
    records = write_data(tmp_path, seed)
    tok = vlm_tokenizer("mllama")
    proc = vlm_processing("mllama", tok)
    examples, _ = tokenize_vision_records(proc, records, max_seq_len=512)
    with pytest.raises(ValueError, match="packing is not supported for Mllama"):
        collate_vision(proc, examples, packing=True, pad_token_id=0)


@pytest.mark.slow
@pytest.mark.parametrize("row", ["qwen2_vl", "llava", "mllama"])
def test_regional_compile_matches_eager(tmp_path, seed, row):
    """Regional compile (aot_eager on CPU: each language-model layer, the final norm, the loss chunk) of a prepared
    VLM: padded and (but Mllama) packed training steps with no graph break and the eager model's loss and LoRA
    gradients."""
    from quickloris.parallel.compile import CompileConfig, compile_model, compile_stats, reset_compile_stats

    records = write_data(tmp_path, seed)
    tok, ref, model = _prepare(row, attention="sdpa" if row == "mllama" else "flex", init_lora_weights="random")
    proc = vlm_processing(row, tok, ref.config)
    examples, _ = tokenize_vision_records(proc, records, max_seq_len=512)
    if row == "mllama":
        examples = [examples[0], examples[2]]  # rows with images: transformers' own per-row image layout
    compiled = compile_model(copy.deepcopy(model).train(), CompileConfig(backend="aot_eager"))
    model.train()
    reset_compile_stats()
    fwd, bwd = _bounds(model)
    for packing in (False, True) if row != "mllama" else (False,):
        batch = collate_vision(proc, examples, packing=packing, pad_token_id=0)
        got = []
        for m in (model, compiled):
            m.zero_grad(set_to_none=True)
            loss = m(**_hf_inputs(batch), labels=batch["labels"]).loss
            loss.backward()
            got.append((loss.detach(), lora_grads(m)))
        assert_close_rel(got[1][0], got[0][0], fwd, f"{row} loss")
        for name, g in got[0][1].items():
            assert_close_rel(got[1][1][name], g, bwd, f"{row} {name}")
    assert compile_stats()["graph_breaks"] == 0
