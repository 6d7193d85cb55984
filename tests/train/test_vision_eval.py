"""Held-out evaluation of vision-language models (`quickloris.train.vision_eval`) on tiny random-init VLMs:

* the replies equal an independent greedy decode - transformers' own image processor / processor building the
  inputs (the image tokens expanded as transformers' processors expand them), transformers' `generate` - on the same
  prompts, rows with one image, two images and none; the exact-match count equals the count of reference answers
  the test made right (half the rows get the reference reply's first line as their answer, the others a wrong one);
* a bad --eval-data row is one line naming --eval-data and file:line.

Both sides run the same model in fp32 on the same inputs through the same transformers code, so the replies are
compared exactly.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.config import ConfigError  # noqa: E402
from quickloris.data.tasks import extract_answer  # noqa: E402
from quickloris.train.vision_eval import (  # noqa: E402
    evaluate_vision,
    generate_vision_replies,
    read_vision_eval,
)
from tests.vlm_tiny import draw, hf_inputs, vlm_model, vlm_processing, vlm_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_TOKENS = 6


def _image(i: int) -> dict:
    return {"type": "image", "image": f"images/{i}.png"}


def _prompts(tmp_path, seed: int) -> list[list[dict]]:
    """Five prompts (one image, none, two, a system turn, an earlier exchange) and their images under images/."""
    (tmp_path / "images").mkdir()
    for i in range(5):
        draw(seed + i).save(tmp_path / "images" / f"{i}.png")
    return [
        [{"role": "user", "content": [_image(0), {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": "Reverse 123"}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare"}, _image(1), _image(2)]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [_image(3)]}],
        [
            {"role": "user", "content": [_image(4), {"type": "text", "text": "Count"}]},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Sure?"},
        ],
    ]


@pytest.mark.parametrize("row", ["qwen2_vl", "llava"])
def test_counts_like_an_independent_greedy_decode(tmp_path, seed, row):
    tok = vlm_tokenizer(row)
    prompts = _prompts(tmp_path, seed)
    # A random-init model's reply can be empty after dropping special tokens (seen: qwen2_vl at seed 2103940452, all
    # the rows picked to be right): there is nothing to count then, so a model drawn from the next seed is taken
    for attempt in range(5):
        torch.manual_seed(seed + attempt)
        model = vlm_model(row, tok)
        references = []
        with torch.no_grad():
            for messages in prompts:
                files = [
                    p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"] if "image" in p
                ]
                inputs = hf_inputs(row, tok, messages, [tmp_path / f for f in files])
                out = model.generate(
                    **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
                )
                references.append(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        answerable = [i for i, reply in enumerate(references) if extract_answer(reply)]
        if answerable:
            break
    assert answerable, "five random-init models in a row replied nothing but special tokens"
    rng = random.Random(seed)
    # right: 1 .. (all answerable rows, at most all but one) of them, the rest get a wrong answer
    right = set(rng.sample(answerable, rng.randint(1, min(len(answerable), len(prompts) - 1))))
    answers = []
    for i, reply in enumerate(references):
        first = extract_answer(reply)
        answers.append(first if i in right else f"not {first}")
    expected = len(right)
    assert 0 < expected < len(prompts)
    path = tmp_path / "held.jsonl"
    path.write_text(
        "".join(
            json.dumps({"messages": [*p, {"role": "assistant", "content": a}]}) + "\n" for p, a in zip(prompts, answers)
        )
    )
    problems = read_vision_eval(str(path))
    processing = vlm_processing(row, tok)
    render = {"chat_template": None, "image_max_size": None}
    replies = generate_vision_replies(model, processing, problems, max_new_tokens=NEW_TOKENS, **render)
    assert replies == references
    lines = []
    result = evaluate_vision(model, processing, problems, max_new_tokens=NEW_TOKENS, echo=lines.append, **render)
    assert (result["correct"], result["total"], result["max_new_tokens"]) == (expected, len(prompts), NEW_TOKENS)
    assert result["accuracy"] == expected / len(prompts)
    assert [s["correct"] for s in result["samples"]] == [answers[i] == extract_answer(references[i]) for i in range(3)]
    assert lines[0].startswith(f"eval: exact match {100 * expected / len(prompts):.1f}% ({expected}/{len(prompts)})")


def _problems(tmp_path, prompts: list[list[dict]]) -> list:
    """`prompts` as --eval-data problems (each answered "x": the replies are compared, not scored)."""
    path = tmp_path / "held.jsonl"
    path.write_text(
        "".join(json.dumps({"messages": [*p, {"role": "assistant", "content": "x"}]}) + "\n" for p in prompts)
    )
    return read_vision_eval(str(path))


def _hf_left_padded(rows: list[dict], pad: int) -> dict:
    """Rows of transformers-built inputs (`hf_inputs`) as one left-padded batch, written here without quickloris:
    token tensors right-aligned, pixel tensors concatenated in row order."""
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for key, fill in (("input_ids", pad), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key in rows[0]:
            out[key] = torch.stack([torch.cat([torch.full((width - r[key].shape[1],), fill), r[key][0]]) for r in rows])
    for key in ("pixel_values", "image_grid_thw"):
        parts = [r[key] for r in rows if key in r]
        if parts:
            out[key] = torch.cat(parts)
    return out


@pytest.mark.parametrize("row", ["qwen2_vl", "llava"])
def test_eval_batches_left_padded_like_transformers(tmp_path, seed, row):
    """--eval-batch-size prompts at a time: batches of 3 and 2 (rows with one image, none, two; left padded) give
    transformers' own greedy `generate` on the same batches built without quickloris (`hf_inputs` per row, padded
    here), and the inputs quickloris builds are those, tensor for tensor."""
    from quickloris.data.vision import collate_vision, prompt_example
    from quickloris.train.vision_eval import left_padded

    tok = vlm_tokenizer(row)
    model = vlm_model(row, tok)
    prompts = _prompts(tmp_path, seed)
    problems = _problems(tmp_path, prompts)
    processing = vlm_processing(row, tok)
    references = []
    with torch.no_grad():
        for start in (0, 3):
            rows = []
            for messages in prompts[start : start + 3]:
                files = [
                    p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"] if "image" in p
                ]
                rows.append(hf_inputs(row, tok, messages, [tmp_path / f for f in files]))
            inputs = _hf_left_padded(rows, tok.pad_token_id)
            ours = left_padded(
                collate_vision(
                    processing,
                    [prompt_example(processing, p.prompt_messages(), p.images) for p in problems[start : start + 3]],
                    packing=False,
                    pad_token_id=tok.pad_token_id,
                )
            )
            for key, value in inputs.items():
                assert torch.equal(ours[key], value), key
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
            references += tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    render = {"chat_template": None, "image_max_size": None}
    replies = generate_vision_replies(model, processing, problems, max_new_tokens=NEW_TOKENS, batch_size=3, **render)
    assert replies == references
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        generate_vision_replies(model, processing, problems, max_new_tokens=1, batch_size=0, **render)


def test_default_max_new_tokens_is_the_text_paths(tmp_path):
    """None: the longest reference answer's tokens + 4, as for text (an answer followed by more is wrong)."""
    from quickloris.train.exact_match import max_new_tokens_for

    (tmp_path / "images").mkdir()
    draw(0).save(tmp_path / "images" / "0.png")
    rows = [("What is it?", "a red blob"), ("Say", "hi")]
    path = tmp_path / "held.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [_image(0), {"type": "text", "text": q}]},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
            + "\n"
            for q, a in rows
        )
    )
    tok = vlm_tokenizer("qwen2_vl")
    problems = read_vision_eval(str(path))
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for _, a in rows)
    assert max_new_tokens_for(tok, problems, None) == longest + 4
    assert [p.answer for p in problems] == ["a red blob", "hi"] and problems[0].question == "<image>What is it?"
    assert problems[0].images == (str(tmp_path / "images" / "0.png"),)


USER = {"role": "user", "content": "q"}


@pytest.mark.parametrize(
    "messages,message",
    [
        (
            [
                {"role": "user", "content": [_image(9), {"type": "text", "text": "x"}]},
                {"role": "assistant", "content": "a"},
            ],
            "messages[0]: image 'images/9.png' not found",
        ),
        ([USER, {"role": "assistant", "content": "a\nb"}], "the reference answer must be one line"),
        ([USER, {"role": "assistant", "content": [{"type": "text", "text": " "}]}], "the reference answer (last"),
        ([USER], "'messages' has no 'assistant' turn"),
        ([USER, {"role": "assistant", "content": "a"}, USER], "the last message must be the reference 'assistant'"),
        ([{"role": "assistant", "content": "a"}], "after at least one prompt message"),
    ],
)
def test_bad_rows_name_the_option_and_the_line(tmp_path, messages, message):
    from quickloris.train.config import EvalConfig

    (tmp_path / "images").mkdir()
    draw(0).save(tmp_path / "images" / "0.png")
    good = {"messages": [{"role": "user", "content": [_image(0)]}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ConfigError) as e:
        read_vision_eval(str(path))
    text = e.value.render({(EvalConfig, "eval_data"): "--eval-data"})
    assert text.startswith(f"--eval-data: {path}:2: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("row", ["mllama", "pixtral"])
def test_eval_batches_equal_one_prompt_at_a_time(tmp_path, seed, row):
    """Families without a transformers-built batch here: a batch of all five prompts gives the replies of one prompt
    at a time (Mllama: rows grouped by image count, so no row meets a padding image slot). fp32 on the same weights:
    padding adds only masked (exactly zero-weight) keys, so the greedy tokens agree."""
    tok = vlm_tokenizer(row)
    model = vlm_model(row, tok)
    prompts = _prompts(tmp_path, seed)
    problems = _problems(tmp_path, prompts)
    processing = vlm_processing(row, tok)
    render = {"chat_template": None, "image_max_size": None, "max_new_tokens": NEW_TOKENS}
    one = generate_vision_replies(model, processing, problems, batch_size=1, **render)
    assert generate_vision_replies(model, processing, problems, batch_size=5, **render) == one
