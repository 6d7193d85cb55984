"""Model loading: format detection for every kind of input, the embedded SmolLM2 GGUF (dense, correct special
tokens, a chat template, sensible answers), GGUF round trip against the model it came from, bnb-4bit folders."""

from __future__ import annotations

import json

import pytest
import torch

from quickloris.models.loading import (
    ModelSource,
    gguf_metadata,
    gguf_special_token_ids,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    max_positions,
    resolve_model,
)
from tests.helpers import require
from tests.tiny import bpe_tokenizer, tiny_model

transformers = pytest.importorskip("transformers")


def _tiny_llama(vocab=64, **kw):
    return tiny_model(vocab_size=vocab, max_position_embeddings=96, bos_token_id=0, eos_token_id=1, **kw).eval()


def _tiny_tokenizer(pad: bool):
    return bpe_tokenizer(
        "smollm",
        300,
        corpus=["hello world 123"],
        specials=("<|bos|>", "<|eos|>", "<|pad|>") if pad else ("<|bos|>", "<|eos|>"),
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )


# ---- format detection (no model loads) ---------------------------------------------------------------------------


def test_resolve_default():
    src = resolve_model(None)
    assert src.format == "default" and src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.path.is_file()
    assert resolve_model("default") == src and src.is_gguf and src.folder == src.path.parent


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist .*models are not downloaded"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown model format: .*not a .gguf file"):
        resolve_model(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(16))
    with pytest.raises(ValueError, match="does not start with the GGUF magic"):
        resolve_model(tmp_path / "fake.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="unknown model format: folder .* has no config.json"):
        resolve_model(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="no weights"):
        resolve_model(no_weights)
    (no_weights / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_model(no_weights)
    with pytest.raises(TypeError, match="model must be a path"):
        resolve_model(3)


@pytest.mark.parametrize(
    "quant, expected",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bnb-4bit"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "type 'fp4' is not"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, r"quant_method='bitsandbytes' \(8-bit\)"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq' are not supported"),
    ],
)
def test_resolve_quantized_folders(tmp_path, quant, expected):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    if expected == "bnb-4bit":
        src = resolve_model(tmp_path)
        assert (src.format, src.quantization_config, src.weight_files) == (
            "bnb-4bit",
            quant,
            (tmp_path / "model.safetensors",),
        )
    else:
        with pytest.raises(ValueError, match=expected):
            resolve_model(tmp_path)


# ---- HF folder ---------------------------------------------------------------------------------------------------


def test_hf_folder_round_trip(tmp_path, seed):
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    _tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    loaded, tok, src = load_model_and_tokenizer(tmp_path)
    assert src.format == "hf" and src.config["model_type"] == "llama" and max_positions(src.config) == 96
    assert max_positions(loaded.config) == 96 and not loaded.training
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert tok.pad_token == tok.eos_token == "<|eos|>"  # no pad token: falls back to EOS
    assert load_model(src, dtype=torch.bfloat16).dtype == torch.bfloat16


# ---- GGUF file -----------------------------------------------------------------------------------------------------


def test_gguf_round_trip(tmp_path, seed):
    """A tiny model written by quickloris' GGUF exporter (f32) loads dense, with the logits of the original,
    and its tokenizer keeps EOS != BOS (transformers' GGUF converter swaps them)."""
    require("quickloris._native")
    import quickloris.export.gguf_export as export

    tok = _tiny_tokenizer(pad=True)
    model = _tiny_llama(vocab=len(tok), pad_token_id=tok.pad_token_id)
    path = tmp_path / "tiny.gguf"
    export.export_gguf(model, path, tokenizer=tok, quant="f32", tokenizer_pre="smollm")
    src = resolve_model(path)
    assert src == ModelSource("gguf", path, weight_files=(path,))
    assert resolve_model(tmp_path).path == path  # a folder holding a single .gguf
    assert gguf_special_token_ids(path) == {"bos": 0, "eos": 1, "pad": 2}
    # the header-only reader agrees with the gguf package on every scalar / string field
    gguf = require("gguf")
    ref = {
        k: f.contents()
        for k, f in gguf.GGUFReader(str(path)).fields.items()
        if not k.startswith("GGUF.") and not isinstance(f.contents(), list)
    }
    assert len(ref) > 10 and gguf_metadata(path, set(ref) | {"absent.key"}) == pytest.approx(ref)
    loaded = load_model(src)
    assert not getattr(loaded, "is_quantized", False) and getattr(loaded.config, "quantization_config", None) is None
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    x = torch.randint(0, len(tok), (2, 11))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    gtok = load_tokenizer(src)
    assert (gtok.bos_token, gtok.eos_token, gtok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert gtok("hello world 123")["input_ids"] == tok("hello world 123")["input_ids"]


# ---- the embedded default ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_tokenizer():
    return load_tokenizer(resolve_model(None))


def test_default_tokenizer(default_tokenizer):
    assert gguf_special_token_ids(resolve_model(None).path) == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    tok = default_tokenizer
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)  # not <|im_start|>, which transformers sets
    assert (tok.pad_token_id, tok.bos_token_id) == (2, 1)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok("4790386", add_special_tokens=False)["input_ids"]  # SmolLM2 splits numbers into single digits
    assert [tok.decode([i]) for i in ids] == list("4790386")


@pytest.mark.slow  # ~15 s: dequantizes the whole GGUF; the same code path is covered fast by test_gguf_round_trip
def test_default_model_is_dense_and_answers(default_tokenizer):
    model, src = load_model(resolve_model(None)), resolve_model(None)
    tok = default_tokenizer
    assert src.format == "default" and model.dtype == torch.float32 and not model.training
    assert not getattr(model, "is_quantized", False) and max_positions(model.config) == 8192
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 30 * 7 + 1  # q k v o gate up down per layer, plus the (tied) head
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "Paris" in reply, reply
    assert out[0, -1].item() == tok.eos_token_id or len(out[0]) == len(ids) + 12


# ---- pre-quantized bitsandbytes NF4 folder --------------------------------------------------------------------------


def test_bnb_4bit_folder(tmp_path, seed):
    bnb = require("bitsandbytes")
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "fp")
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=qcfg, device_map="cpu"
    )
    folder = tmp_path / "tiny-bnb-4bit"
    quantized.save_pretrained(folder)
    src = resolve_model(folder)
    assert src.format == "bnb-4bit" and src.quantization_config["bnb_4bit_use_double_quant"] is True
    assert [p.name for p in src.weight_files] == ["model.safetensors"]
    loaded = load_model(src)
    q_proj = loaded.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    ref = quantized.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q_proj.weight.data, ref.data)  # the packed bytes, unchanged
    torch.testing.assert_close(q_proj.weight.quant_state.absmax, ref.quant_state.absmax)
    x = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(loaded(x).logits, quantized(x).logits)


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    """`device=` puts HF, GGUF and bnb-4bit models on the GPU, with the CPU model's logits."""
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 64, (2, 7))
    ref = model(x).logits
    gpu = load_model(resolve_model(tmp_path / "hf"), device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu(x.cuda()).logits.cpu(), ref, rtol=1e-3, atol=1e-3)
    require("quickloris._native")
    import quickloris.export.gguf_export as export

    tok = _tiny_tokenizer(pad=True)
    gmodel = _tiny_llama(vocab=len(tok), pad_token_id=tok.pad_token_id)
    export.export_gguf(gmodel, tmp_path / "t.gguf", tokenizer=tok, quant="f32", tokenizer_pre="smollm")
    loaded = load_model(resolve_model(tmp_path / "t.gguf"), device="cuda")
    y = torch.randint(0, len(tok), (1, 9))
    torch.testing.assert_close(loaded(y.cuda()).logits.cpu(), gmodel(y).logits, rtol=1e-3, atol=1e-3)
