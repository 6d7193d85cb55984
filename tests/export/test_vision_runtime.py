"""The exported pair of files in llama.cpp's multimodal runtime (libmtmd, built from the sdist's llama.cpp against the
installed llama-cpp-python: tests/export/llama_cpp_ref.py), against the Hugging Face model on the same image drawn
with PIL, for every family and mmproj type.

The reference is the HF model computing as llama.cpp's CPU code does (`mtmd_runner.ggml_twin`): the mmproj's weights
as stored (F16 / BF16 / Q8_0 rounded by the C++ core, byte-identical to ggml), each matmul's input rounded as ggml
rounds it for that weight type (its ``vec_dot_type``: fp16, bf16, Q8_0 blocks), GELU / quick-GELU through ggml's
fp16 tables, the patch convolution in fp16 (ggml's im2col). With that, llama.cpp and the reference round the same
values at the same places, and differ only where float32 noise (~1e-7) puts a value on the other side of a rounding
boundary: that value then differs by one rounding step of its type (up to 2^-10 of its size for fp16 and the tables,
2^-7 for bf16, 1/127 of its block's largest for Q8_0), which the following layers carry to the embeddings. How far
one such flip can move an embedding is computed from the reference itself (`mtmd_runner.flip_bound`: each rounded
value's step times the largest Jacobian entry of the embeddings with respect to it, over every rounded value), not
assumed: the layers' gains vary with the random weights (0.6 - 1.5 fp16 steps of the largest embedding for the tiny
Llava towers, seeds 0-9). `FLIPS` allows three flips at their worst place: in half the runs no rounding flips,
in most others one does, and a flip upstream shifts the values downstream by up to a step, which can tip one more
rounding there (the largest measured, 1.5 bounds, seed 7 of llava-f16-spm: a flip in the encoder tipped an input
of the projector; it was 0.86 of the fixed two-step tolerance used before). Q8_0 allows five: its step is 1/127
of the block's largest value, so a flip's shift downstream is of the size of the next Q8_0 step there and tips
roundings across the rows attention mixes (seed 38 of qwen2_5_vl-q8_0: 23 of 30 rows off by ~1 bound, the largest
2.6 bounds). A mapping error moves the embeddings
by far more: the vision layer norm's epsilon written 100x too large gives 8 - 23 times the tolerance (seeds 0-4).
Qwen's embeddings are also checked against the HF model as it is (float32, erf GELU), within `EXACT_TOL`.

The language model (F32) then sees the image: llama.cpp's logits after the prompt and after each generated token
equal the HF model's, given the reference's image embeddings, within LOGIT_TOL (tests/export/test_llama_cpp.py:
F32 rounding of a 2-layer model) plus the embeddings' tolerance; every greedy token llama.cpp picks is the HF
model's argmax, or within twice that tolerance of it where the two best logits are that close.

Llava: llama.cpp's llava graph (ggml-org/llama.cpp#25814, in llama-cpp-python 0.3.36) appends CLIP's CLS token
after the patches, shifting the position embeddings by one and projecting CLS in place of the first patch; the
reference reproduces that (`llava_twin_features(cls_last=True)`), and a check asserts the defect is still there
(so that a llama.cpp with the fix makes this test say so). Llava-NeXT: llama.cpp cuts the image into its own tiles
(see `quickloris.export.archs.llava`); each tile's embedding is checked, and the language model on the embeddings
llama.cpp produced.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from quickloris.export import export_gguf
from tests.export import llama_cpp_ref as ref
from tests.export import mtmd_runner as R
from tests.export import vlm_models as V
from tests.helpers import missing_dependency, within

LOGIT_TOL = 2e-5
FLIPS = {"q8_0": 5}  # flips allowed per mmproj type (the module docstring); 3 for the others
F32_NOISE = 1e-5  # relative: float32 sums in another order, ~1e-7 per operation over a few dozen
# llama.cpp against the HF model as it is: the places where ggml rounds to fp16 and HF does not (pixels and patch
# kernel, each block's and the merger's GELU tables, an F16 file's weights and matmul inputs) each cost up to one fp16
# rounding, 2^-11 relative, and the merger's tanh GELU differs from HF's erf GELU by < 5e-4 of its input's scale:
# some 8 such units over the tiny towers (measured: <= ~5e-4 of 3.9e-3)
EXACT_TOL = 8 * 2**-11
N_GEN = 4
PROMPT = ("Describe ", " in a few words")
IMAGES = {"llava": (16, 16), "llava_next": (32, 32), "qwen2_vl": (84, 112), "qwen2_5_vl": (168, 140)}
# (family, mmproj type, tokenizer): "bpe" a byte-level BPE, "spm" a SentencePiece BPE as Llava-1.5's (Vicuna's)
CASES = [
    ("llava", "f16", "bpe"),
    ("llava", "q8_0", "bpe"),
    ("llava", "f16", "spm"),
    ("llava_next", "f32", "bpe"),
    ("qwen2_vl", "f32", "bpe"),
    ("qwen2_vl", "bf16", "bpe"),
    ("qwen2_5_vl", "f16", "bpe"),
    ("qwen2_5_vl", "q8_0", "bpe"),
]


@pytest.fixture(scope="session")
def mtmd_lib():
    try:
        return ref.mtmd_library()
    except Exception as e:  # noqa: BLE001 - one line: what is missing
        missing_dependency("libmtmd", f"it could not be built from the llama-cpp-python sdist ({e})")


def _export(tmp_path, family, qtype, seed, tokenizer="bpe"):
    tok = V.tokenizer(family) if tokenizer == "bpe" else V.spm_tokenizer(tmp_path / "tokenizer")
    model = V.model(family, tok)
    folder = V.save(tmp_path / "model", family, model, tok)
    out = tmp_path / "model.gguf"
    result = export_gguf(model, out, tokenizer=tok, quant="f32", mmproj_quant=qtype, processor=folder)
    image = V.image(*IMAGES[family], seed=seed)
    return tok, model, folder, out, result, image


def _hf_ids(tok, family, model, n_image: int, spm: bool = False) -> tuple[list[int], list[int], list[int]]:
    """(ids before the image, the image's ids, ids after) as the HF processors lay them out. `spm`: a SentencePiece
    tokenizer, whose text after the image llama.cpp tokenizes as sentencepiece does, with a "▁" before its leading
    space (tests/export/test_tokenizer_spm.py), which HF gives for the text after one more space."""
    before = tok(PROMPT[0])["input_ids"]
    after = tok(" " * spm + PROMPT[1], add_special_tokens=False)["input_ids"]
    cfg = model.config
    if family.startswith("llava"):
        return before, [cfg.image_token_index] * n_image, after
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + [cfg.vision_end_token_id]
    return before, image, after


def _qwen_inputs(folder, image) -> dict:
    """pixel_values and image_grid_thw of an image whose sides are multiples of 28 (no resizing)."""
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)  # the PIL one: no torchvision here
    return processor(images=image, do_resize=False, return_tensors="pt")


def _qwen_features(model, inputs) -> torch.Tensor:
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    feats = getattr(feats, "pooler_output", feats)
    return feats[0] if isinstance(feats, (list, tuple)) else feats


def _twin_features(fn, emb: np.ndarray, qtype: str = "f32") -> tuple[np.ndarray, float]:
    """(the twin's image embeddings, how far llama.cpp's `emb` may be from them): `FLIPS` flips at their worst place
    (`mtmd_runner.flip_bound`) plus float32 noise."""
    feats, bound = R.flip_bound(fn, emb)
    return feats, FLIPS.get(qtype, 3) * bound + F32_NOISE * float(np.abs(feats).max())


def _placeholders(model) -> tuple[int, ...]:
    """The image placeholder ids of `model` (generation never picks them: `R.run_mtmd`'s `never`)."""
    cfg = model.config
    names = ("image_token_index", "image_token_id", "vision_start_token_id", "vision_end_token_id")
    return tuple(int(getattr(cfg, n)) for n in names if getattr(cfg, n, None) is not None)


def _check_logits(run, hf_logits: np.ndarray, tol_rel: float, seed, never: tuple[int, ...]) -> None:
    """llama.cpp's logits after the prompt and after each generated token against HF's (teacher-forced on
    llama.cpp's tokens), and each greedy token (never one of `never`) against HF's best of the others."""
    assert len(run.logits) == len(hf_logits) == N_GEN + 1
    scale = np.abs(hf_logits).max()
    assert hf_logits.std() > 0.1  # logits that depend on the weights, not a flat distribution
    for step, (ours, theirs) in enumerate(zip(run.logits, hf_logits)):
        within(np.abs(ours - theirs).max(), tol_rel * scale, f"seed {seed}: logits after step {step}")
    allowed = hf_logits.copy()
    allowed[:, list(never)] = -np.inf
    for step, tok in enumerate(run.tokens):
        assert tok not in never
        best = allowed[step].max()
        assert allowed[step, tok] >= best - 2 * tol_rel * scale, f"seed {seed}: token {step} {tok} is not HF's"
        if np.sort(allowed[step])[-2] < best - 2 * tol_rel * scale:  # a clear winner: the same token
            assert tok == int(allowed[step].argmax()), f"seed {seed}: step {step}"


@pytest.mark.parametrize("family, qtype, tokenizer", CASES, ids=[f"{f}-{t}-{k}" for f, t, k in CASES])
def test_mtmd_runs_the_export_as_hf(family, qtype, tokenizer, tmp_path, seed, mtmd_lib):
    tok, model, folder, out, result, image = _export(tmp_path, family, qtype, seed, tokenizer)
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.model"].contents() == ("llama" if tokenizer == "spm" else "gpt2")
    never = _placeholders(model)
    run = R.run_mtmd(mtmd_lib, out, result.mmproj_path, PROMPT[0] + R.MARKER + PROMPT[1], image, N_GEN, never=never)
    if family == "llava_next":
        return _check_llava_next(run, tok, model, image, qtype, seed, never)
    assert run.chunk_kinds == ["text", "image", "text"]
    (emb,) = run.image_embeddings
    before, image_ids, after = _hf_ids(tok, family, model, len(emb), spm=tokenizer == "spm")
    # the text around the image tokenizes as in HF (Qwen: libmtmd adds <|vision_start|> / <|vision_end|> itself)
    if family == "llava":
        assert run.text_chunks == [before, after]
    else:
        assert run.text_chunks == [before + image_ids[:1], image_ids[-1:] + after]
    ids = before + image_ids + after + run.tokens
    if family == "llava":
        pixels = R.pixel_values(image, V.CLIP_MEAN, V.CLIP_STD)
        feats, tol = _twin_features(lambda: R.llava_twin_features(model, pixels, qtype), emb, qtype)
        fixed = R.llava_twin_features(model, pixels, qtype, cls_last=False).numpy()
        # llama.cpp#25814 still there: the HF order is far off (a llama.cpp with the fix fails here: use cls_last=False)
        assert np.abs(emb - fixed).max() > 10 * tol
        with torch.no_grad():
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            start = len(before)
            embeds[0, start : start + len(feats)] = torch.from_numpy(feats)
            hf_logits = model(inputs_embeds=embeds).logits[0].float().numpy()
    else:
        inputs = _qwen_inputs(folder, image)
        types = R.linear_types(model, qtype)
        with R.ggml_twin(model, types, convs=("model.visual.patch_embed.proj",)):
            feats, tol = _twin_features(lambda: _qwen_features(model, inputs), emb, qtype)
            input_ids = torch.tensor([ids])
            kinds = (input_ids == model.config.image_token_id).long()  # 1: image, 0: text (M-RoPE positions)
            with torch.no_grad():
                hf_logits = model(input_ids=input_ids, mm_token_type_ids=kinds, **inputs).logits[0].float().numpy()
    within(np.abs(emb - feats).max(), tol, f"seed {seed}: image embeddings ({qtype})")
    if family.startswith("qwen") and qtype in ("f32", "f16"):  # and the HF model as it is, in float32
        with torch.no_grad():
            exact = _qwen_features(model, inputs).numpy()
        within(np.abs(emb - exact).max(), EXACT_TOL * np.abs(exact).max(), f"seed {seed}: exact HF embeddings")
    n_prompt = len(ids) - len(run.tokens)
    _check_logits(run, hf_logits[n_prompt - 1 :], LOGIT_TOL + tol / np.abs(feats).max(), seed, never)


def _check_llava_next(run, tok, model, image, qtype, seed, never):
    """A 32 x 32 image is the 32x32 pinpoint: four 16 x 16 tiles, which llama.cpp encodes as the HF tower (with the
    CLS defect) encodes each tile, then its own overview (the image resized by its bicubic, not compared); the
    language model on llama.cpp's image embeddings in llama.cpp's layout equals HF's."""
    pixels = R.pixel_values(image, V.CLIP_MEAN, V.CLIP_STD)
    tiles = [pixels[:, :, y : y + 16, x : x + 16] for y in (0, 16) for x in (0, 16)]
    assert run.chunk_kinds == ["text"] + ["image"] * 5 + ["text"]
    for i, t in enumerate(tiles):  # the tiles in row-major order, then the overview
        f, tol = _twin_features(lambda t=t: R.llava_twin_features(model, t, qtype), run.image_embeddings[i], qtype)
        within(np.abs(run.image_embeddings[i] - f).max(), tol, f"seed {seed}: tile {i}")
    before = tok(PROMPT[0])["input_ids"]
    after = tok(PROMPT[1], add_special_tokens=False)["input_ids"]
    assert run.text_chunks == [before, after]
    text, images = iter(run.text_chunks), iter(run.image_embeddings)
    with torch.no_grad():
        embed = model.get_input_embeddings()
        parts = [
            embed(torch.tensor(next(text))) if k == "text" else torch.from_numpy(next(images)) for k in run.chunk_kinds
        ]
        parts.append(embed(torch.tensor(run.tokens)))
        logits = model(inputs_embeds=torch.cat(parts)[None]).logits[0].float().numpy()
    _check_logits(run, logits[-(N_GEN + 1) :], LOGIT_TOL, seed, never)


def test_fine_tuned_vlm_end_to_end(tmp_path, seed, mtmd_lib):
    """A LoRA fine-tune of the language model (and of the ViT's attention) made with PEFT, exported by the CLI and run
    by libmtmd: its image embeddings and greedy tokens are the PeftModel's (adapter unmerged, as trained). With the
    default merge base (NF4: the adapter's base as QLoRA trained it) the language model's linears hold the NF4 base
    plus the delta, the other weights the base in the run's dtype (float32 without a run config)."""
    from peft import LoraConfig, get_peft_model

    from quickloris.cli.main import main

    family = "qwen2_5_vl"
    tok = V.tokenizer(family)
    model = V.model(family, tok)
    folder = V.save(tmp_path / "model", family, model, tok)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "qkv"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")

    def export(out, *more) -> None:
        args = ["export", "gguf", "--model", folder, "--adapter", tmp_path / "adapter", "--out", out, "--quant", "f32"]
        assert main([str(a) for a in [*args, *more]]) == 0

    export(tmp_path / "tuned.gguf", "--mmproj-quant", "f32", "--merge-base", "original")
    image = V.image(*IMAGES[family], seed=seed)
    prompt = PROMPT[0] + R.MARKER + PROMPT[1]
    never = _placeholders(model)
    run = R.run_mtmd(
        mtmd_lib, tmp_path / "tuned.gguf", tmp_path / "tuned.mmproj.gguf", prompt, image, N_GEN, never=never
    )
    (emb,) = run.image_embeddings
    before, image_ids, after = _hf_ids(tok, family, model, len(emb))
    ids = torch.tensor([before + image_ids + after + run.tokens])
    inputs = _qwen_inputs(folder, image)
    base = peft_model.get_base_model()
    with R.ggml_twin(base, convs=("model.visual.patch_embed.proj",)):
        feats, tol = _twin_features(lambda: _qwen_features(base, inputs), emb)
        kinds = (ids == model.config.image_token_id).long()
        with torch.no_grad():
            logits = peft_model(input_ids=ids, mm_token_type_ids=kinds, **inputs).logits[0].float().numpy()
    within(np.abs(emb - feats).max(), tol, f"seed {seed}: tuned image embeddings")
    _check_logits(run, logits[ids.shape[1] - N_GEN - 1 :], LOGIT_TOL + tol / np.abs(feats).max(), seed, never)

    export(tmp_path / "nf4.gguf")  # the default merge base
    text = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "nf4.gguf").tensors}
    vision = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "nf4.mmproj.gguf").tensors}
    q = base.model.language_model.layers[0].self_attn.q_proj
    merged = (q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight).detach().numpy()
    err = np.abs(text["blk.0.attn_q.weight"] - merged).max()
    assert 0 < err < 0.2 * np.abs(merged).max()  # NF4's quantization error of the base, nothing else
    norm = base.model.language_model.layers[0].post_attention_layernorm.weight
    np.testing.assert_array_equal(text["blk.0.ffn_norm.weight"], norm.detach().numpy())
    up = base.model.visual.blocks[1].mlp.up_proj.weight  # no adapter there: the base as stored (float32)
    np.testing.assert_array_equal(vision["v.blk.1.ffn_up.weight"], up.detach().numpy())


@pytest.mark.parametrize("train_vision", [False, True], ids=["language-model", "train-vision"])
def test_quickloris_fine_tune_end_to_end(train_vision, tmp_path, seed, mtmd_lib):
    """`quickloris train` on a tiny Qwen2-VL folder (three JSONL rows, two with images; 4 steps on the CPU), then
    `quickloris export gguf --adapter RUN/adapter` with the default merge base (NF4, with the settings of the run's
    config.json): libmtmd's image embeddings and greedy tokens / logits are the trained model's - the folder's model
    prepared as the run prepared it (NF4 language-model linears + LoRA, float32; with --train-vision LoRA on the
    vision linears too) with the run's adapter loaded - within the F32 tolerances above. The adapter moves the logits
    (and with --train-vision the embeddings) by far more than that, so an export without it fails."""
    import dataclasses

    from quickloris.cli.main import main
    from quickloris.models.adapters import load_adapter, read_adapter_config
    from quickloris.models.loading import resolve_model
    from quickloris.models.prepare import prepare_model
    from quickloris.train.evaluation import run_quantization
    from quickloris.train.vision import load_vision_model
    from tests.models.test_vision import write_data
    from tests.vlm_tiny import chat_template

    family = "qwen2_vl"
    tok = V.tokenizer(family)
    tok.chat_template = chat_template(family)
    folder = V.save(tmp_path / "model", family, V.model(family, tok), tok)
    write_data(tmp_path, seed)
    run = tmp_path / "run"
    train = ["train", "--model", folder, "--data", tmp_path / "vlm.jsonl", "--output-dir", run, "--threads", "1"]
    train += ["--no-progress", "--batch-size", "2", "--max-steps", "4", "--lr", "2e-2", "--r", "4"]
    assert main([str(a) for a in train + ["--train-vision"] * train_vision]) == 0
    out = tmp_path / "tuned.gguf"
    export = ["export", "gguf", "--model", folder, "--adapter", run / "adapter", "--out", out, "--quant", "f32"]
    assert main([str(a) for a in export + ["--mmproj-quant", "f32"]]) == 0

    def prepared(adapter: bool):
        # the run's targets are the default ones; prepare_model(adapter=) takes no vision targets, so the adapter's
        # rank and alpha are given and its weights loaded after (every LoRA layer must find its tensors)
        model = load_vision_model(resolve_model(str(folder)), dtype=torch.float32, device="cpu")
        acfg = read_adapter_config(run / "adapter")
        cfg = dataclasses.replace(
            run_quantization(run / "adapter"), r=acfg["r"], lora_alpha=acfg["lora_alpha"], train_vision=train_vision
        )
        model = prepare_model(model, cfg).eval()
        return load_adapter(model, run / "adapter") if adapter else model

    trained, nf4_base = prepared(True), prepared(False)  # the second: the same NF4 base, LoRA B = 0
    image = V.image(*IMAGES[family], seed=seed)
    never = _placeholders(trained)
    run_ = R.run_mtmd(
        mtmd_lib, out, tmp_path / "tuned.mmproj.gguf", PROMPT[0] + R.MARKER + PROMPT[1], image, N_GEN, never=never
    )
    (emb,) = run_.image_embeddings
    before, image_ids, after = _hf_ids(tok, family, trained, len(emb))
    assert run_.text_chunks == [before + image_ids[:1], image_ids[-1:] + after]
    ids = torch.tensor([before + image_ids + after + run_.tokens])
    inputs = _qwen_inputs(folder, image)
    kinds = (ids == trained.config.image_token_id).long()
    outs = {}
    for name, model in (("trained", trained), ("base", nf4_base)):
        with R.ggml_twin(model, convs=("model.visual.patch_embed.proj",)):
            feats, tol = _twin_features(lambda model=model: _qwen_features(model, inputs), emb)
            with torch.no_grad():
                logits = model(input_ids=ids, mm_token_type_ids=kinds, **inputs).logits[0].float().numpy()
        outs[name] = feats, tol, logits[ids.shape[1] - N_GEN - 1 :]
    (feats, tol, logits), (base_feats, _, base_logits) = outs["trained"], outs["base"]
    within(np.abs(emb - feats).max(), tol, f"seed {seed}: trained image embeddings")
    emb_rel = tol / np.abs(feats).max()
    _check_logits(run_, logits, LOGIT_TOL + emb_rel, seed, never)
    scale = np.abs(logits).max()
    assert np.abs(logits - base_logits).max() > 10 * (LOGIT_TOL + emb_rel) * scale, "the adapter changed nothing"
    moved = np.abs(feats - base_feats).max() > 10 * tol
    assert moved == train_vision, f"vision LoRA moved the embeddings: {moved}"
