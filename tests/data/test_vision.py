"""Vision-language data (`quickloris.data.vision`): records, resizing, the trained-token mask token by token in a batch
mixing text-only and image rows, image-token expansion checked against the models' own feature counts and against
transformers' reference functions (Qwen's mRoPE index, Mllama's cross-attention token mask), honest --max-seq-len."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from quickloris.data.chat import IGNORE_INDEX  # noqa: E402
from quickloris.data.jsonl import DataFormatError  # noqa: E402
from quickloris.data.vision import (  # noqa: E402
    collate_vision,
    cross_attention_spans,
    load_image,
    mrope_positions,
    read_vision_jsonl,
    resized_size,
    tokenize_vision_records,
)
from tests.vlm_tiny import VLM_ROWS, draw, vlm_config, vlm_processing, vlm_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, rows, images=()):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name, img in images:
        img.save(tmp_path / "images" / name)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _img(name):
    return {"type": "image", "image": f"images/{name}"}


def _mixed(tmp_path, seed):
    images = [(f"{i}.png", draw(seed + i)) for i in range(3)]
    rows = [
        {
            "messages": [
                {"role": "user", "content": [_img("0.png"), {"type": "text", "text": "what?"}]},
                {"role": "assistant", "content": "a dot"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "Reverse 12"},
                {"role": "assistant", "content": "21"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "12"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "two"}, _img("1.png"), _img("2.png")]},
                {"role": "assistant", "content": "1 2"},
            ]
        },
    ]
    return read_vision_jsonl(_write(tmp_path, rows, images))


@pytest.mark.parametrize("row", VLM_ROWS)
def test_trained_tokens_token_by_token_in_a_mixed_batch(tmp_path, seed, row):
    """In one padded batch of image and text-only rows: exactly the assistant replies and their end-of-turn marker
    are trained; every image token is context; pixel inputs come from the image rows only."""
    tok = vlm_tokenizer(row)
    proc = vlm_processing(row, tok)
    records = _mixed(tmp_path, seed)
    examples, stats = tokenize_vision_records(proc, records, max_seq_len=1024)
    batch = collate_vision(proc, examples, packing=False, pad_token_id=0)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    replies = [["a dot"], ["21", "12"], ["1 2"]]
    for b in range(len(examples)):
        ids, labels = batch["input_ids"][b].tolist(), batch["labels"][b].tolist()
        n = int(batch["attention_mask"][b].sum())
        want = [IGNORE_INDEX] * len(ids)
        got_replies = []
        for i in range(n):  # a reply: the tokens after <|im_start|>assistant\n up to and with <|im_end|>
            if ids[i] == start and ids[i + 1 : i + 1 + len(header)] == header:
                j = i + 1 + len(header)
                k = ids.index(end, j)
                want[j : k + 1] = ids[j : k + 1]
                got_replies.append(tok.decode(ids[j:k]))
        assert labels == want, f"{row} row {b}"
        assert got_replies == replies[b]
        assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == proc.image_token_id)
    assert stats.images == 3 and stats.rows_with_images == 2
    n_image_tokens = int((batch["input_ids"] == proc.image_token_id).sum())
    assert n_image_tokens == proc.count(batch) > 0
    if row == "mllama":
        assert batch["image_rows"].tolist() == [0, 2] and batch["pixel_values"].shape[:2] == (2, 2)
        assert not batch["cross_attention_mask"][1].any()
    else:
        text_only = collate_vision(proc, [examples[1]], packing=False, pad_token_id=0)
        assert "pixel_values" not in text_only  # the vision tower is not run for a batch without images


def test_resized_size_keeps_aspect_and_snaps(seed):
    rnd = random.Random(seed)
    for _ in range(200):
        w, h, snap = rnd.randint(1, 3000), rnd.randint(1, 3000), rnd.choice([1, 14, 16, 28])
        m = rnd.randint(snap, 1200)
        W, H = resized_size(w, h, m, snap)
        assert W % snap == 0 and H % snap == 0 and snap <= min(W, H) and max(W, H) <= m
        scale = min(1.0, m / max(w, h))
        # each side is within half a snap step of the scaled side (or clamped at snap / the top multiple)
        for got, orig in ((W, w), (H, h)):
            assert abs(got - orig * scale) <= snap / 2 + 1e-9 or got in (snap, m // snap * snap)
    with pytest.raises(ValueError, match="smaller than"):
        resized_size(100, 100, 20, 28)


def test_image_max_size_is_honoured_by_the_pixels(tmp_path):
    """A 200 x 50 image with --image-max-size 56 on Qwen (patch 14 x merge 2 = 28): 56 x 28 pixels, so a 2 x 4 patch
    grid and 2 image tokens; without the limit the processor's own max_pixels decides (more tokens)."""
    tok = vlm_tokenizer("qwen2_vl")
    proc = vlm_processing("qwen2_vl", tok)
    rows = [{"messages": [{"role": "user", "content": [_img("w.png")]}, {"role": "assistant", "content": "x"}]}]
    records = read_vision_jsonl(_write(tmp_path, rows, [("w.png", draw(1, (200, 50)))]))
    assert load_image(tmp_path / "images" / "w.png", 56, proc.snap).size == (56, 28)
    small, _ = tokenize_vision_records(proc, records, max_seq_len=1024, image_max_size=56)
    batch = collate_vision(proc, small, packing=False, pad_token_id=0, image_max_size=56)
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 2
    big, _ = tokenize_vision_records(proc, records, max_seq_len=1024)
    assert len(big[0]) > len(small[0])


def test_max_seq_len_counts_image_tokens_and_never_cuts(tmp_path, seed):
    tok = vlm_tokenizer("pixtral")
    proc = vlm_processing("pixtral", tok)
    records = _mixed(tmp_path, seed)
    full, _ = tokenize_vision_records(proc, records, max_seq_len=4096)
    text_len, image_lens = len(full[1]), [len(full[0]), len(full[2])]
    limit = max(text_len, max(image_lens) - 1)  # the text row fits, the longest image row does not
    kept, stats = tokenize_vision_records(proc, records, max_seq_len=limit)
    assert [e.input_ids for e in kept] == [e.input_ids for e in full if len(e) <= limit]  # kept rows whole
    assert stats.dropped_too_long == sum(n > limit for n in image_lens) >= 1 and stats.longest == max(image_lens)
    line = 1 if image_lens[0] > limit else 3
    with pytest.raises(DataFormatError, match=rf"d\.jsonl:{line}: .* with its images expanded, longer than --max-seq"):
        tokenize_vision_records(proc, records, max_seq_len=limit, overflow="error")


def test_bad_records_name_the_line(tmp_path):
    tok = vlm_tokenizer("llava")
    proc = vlm_processing("llava", tok)
    ok = {"role": "assistant", "content": "x"}
    with pytest.raises(DataFormatError, match=r"d\.jsonl:1: messages\[0\]: image 'images/nope.png' not found"):
        read_vision_jsonl(_write(tmp_path, [{"messages": [{"role": "user", "content": [_img("nope.png")]}, ok]}]))
    with pytest.raises(DataFormatError, match=r"d\.jsonl:1: .*image in a 'assistant' turn"):
        read_vision_jsonl(
            _write(tmp_path, [{"messages": [{"role": "assistant", "content": [_img("a.png")]}]}], [("a.png", draw(0))])
        )
    rows = [{"messages": [{"role": "user", "content": [_img("a.png")]}, ok]}]
    records = read_vision_jsonl(_write(tmp_path, rows, [("a.png", draw(0))]))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # drops the image
    with pytest.raises(DataFormatError, match="rendered 0 image placeholders"):
        tokenize_vision_records(proc, records, max_seq_len=512)


@pytest.mark.parametrize("row", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_equal_transformers_rope_index(tmp_path, seed, row):
    import transformers

    tok = vlm_tokenizer(row)
    cfg = vlm_config(row, tok)
    proc = vlm_processing(row, tok, cfg)
    examples, _ = tokenize_vision_records(proc, _mixed(tmp_path, seed), max_seq_len=1024)
    model = getattr(transformers, {"qwen2_vl": "Qwen2VLModel", "qwen2_5_vl": "Qwen2_5_VLModel"}[row])(cfg)
    for ex in examples:
        batch = collate_vision(proc, [ex], packing=False, pad_token_id=0)
        kw = {"image_grid_thw": batch["image_grid_thw"]} if ex.images else {}
        if not ex.images:
            continue  # transformers computes text-only positions as 0..n-1 itself; mrope_positions gives (c, c, c)
        want, _ = model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], **kw)
        got = mrope_positions(ex.input_ids, proc.image_token_id, ex.grids)
        assert torch.equal(got, want[:, 0])
    text = examples[1]
    assert torch.equal(mrope_positions(text.input_ids, proc.image_token_id, ()), torch.arange(len(text)).expand(3, -1))


def test_cross_attention_spans_equal_transformers(seed):
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    rnd = random.Random(seed)
    for _ in range(300):
        ids = [rnd.choice([5, 5, 5, 9]) for _ in range(rnd.randint(1, 12))]
        want = [(a, len(ids) if b == -1 else b) for a, b in get_cross_attention_token_mask(ids, 9)]
        assert cross_attention_spans(ids, 9) == want, ids
