"""Response-only labels from prefix renders of the chat template, on SmolLM2's real tokenizer and template."""

from __future__ import annotations

import random

import pytest

from quickloris.data.chat import (
    IGNORE_INDEX,
    check_max_seq_len,
    tokenize_chat,
    tokenize_record,
    tokenize_records,
    tokenize_text,
)
from quickloris.data.jsonl import DataFormatError, Record, parse_record


def _trained_runs(tok, ex):
    """Decoded maximal runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, y in zip(ex.input_ids, ex.labels):
        if y != IGNORE_INDEX:
            assert y == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_single_turn_matches_hf_and_trains_only_the_answer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [
        {"role": "system", "content": "Add the two numbers."},
        {"role": "user", "content": "479 + 386"},
        {"role": "assistant", "content": "865"},
    ]
    ex = tokenize_chat(tok, msgs)
    assert ex.input_ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    assert _trained_runs(tok, ex) == ["865<|im_end|>"]
    # the prompt part is exactly what generation starts from
    prompt = tok.apply_chat_template(msgs[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    first = next(t for t, y in enumerate(ex.labels) if y != IGNORE_INDEX)
    assert ex.input_ids[:first] == list(prompt)
    assert ex.num_trainable == 4  # '8', '6', '5', '<|im_end|>'


def test_multi_turn_trains_every_assistant_turn_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},
    ]  # ends with a user turn: nothing after it is trained
    ex = tokenize_chat(tok, msgs)
    assert _trained_runs(tok, ex) == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ex.input_ids)  # template's default system


def test_random_conversations(smollm2_tokenizer, seed):
    """Random contents (digits, unicode, whitespace, template-like text): the ids are HF's own rendering and
    each assistant turn is one run of trained tokens: its content plus <|im_end|>."""
    tok = smollm2_tokenizer
    rng = random.Random(seed)
    alphabet = list("abc XYZ 0123456789 +-=\n\t.,!?") + ["é", "日本", "🙂", "<|im_start|>user", "  "]
    for _ in range(10):
        msgs = (
            [{"role": "system", "content": "".join(rng.choices(alphabet, k=rng.randint(1, 8)))}]
            if rng.random() < 0.5
            else []
        )
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": "".join(rng.choices(alphabet, k=rng.randint(0, 10)))})
            msgs.append({"role": "assistant", "content": "".join(rng.choices(alphabet, k=rng.randint(0, 10)))})
        ex = tokenize_chat(tok, msgs)
        assert ex.input_ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False)), seed
        runs = _trained_runs(tok, ex)
        want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(want), seed
        for run, w in zip(runs, want):
            # a reply starting with whitespace can lose it to a token that also holds the template's "\n"
            assert w.endswith(run) and not w[: len(w) - len(run)].strip(), (seed, run, w)


def test_empty_completion_trains_only_end_of_turn(smollm2_tokenizer):
    ex = tokenize_chat(
        smollm2_tokenizer, [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": ""}]
    )
    assert _trained_runs(smollm2_tokenizer, ex) == ["<|im_end|>"]


def test_conversational_prompt_completion_keeps_few_shot_turns_as_context(smollm2_tokenizer):
    rec = parse_record(
        {
            "prompt": [
                {"role": "user", "content": "1+1"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2"},
            ],
            "completion": [{"role": "assistant", "content": "4"}],
        }
    )
    assert _trained_runs(smollm2_tokenizer, tokenize_record(smollm2_tokenizer, rec)) == ["4<|im_end|>"]


def test_text_records_mask_prompt_add_bos_and_eos(tiny_tokenizer, smollm2_tokenizer):
    tok = tiny_tokenizer  # its post-processor adds <|bos|>
    ex = tokenize_text(tok, "The answer is", " 42.")
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE_INDEX
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id
    assert ex.input_ids[1:-1] == tok("The answer is 42.", add_special_tokens=False)["input_ids"]
    assert _trained_runs(tok, ex) == [" 42.<|eos|>"]
    # SmolLM2 adds no BOS; empty prompt: everything is trained
    ex = tokenize_text(smollm2_tokenizer, "", "abc")
    assert _trained_runs(smollm2_tokenizer, ex) == ["abc<|im_end|>"] and ex.labels[0] != IGNORE_INDEX


def test_inconsistent_template_raises(smollm2_tokenizer):
    # renders the last message differently from earlier ones, so prefixes do not line up
    template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataFormatError, match="does not render conversation prefixes consistently"):
        tokenize_chat(smollm2_tokenizer, msgs, chat_template=template)
    with pytest.raises(DataFormatError, match="chat template failed"):
        tokenize_chat(smollm2_tokenizer, msgs, chat_template="{{ raise_exception('only user turns') }}")


def test_missing_template_raises(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_records(tok, [parse_record({"messages": [{"role": "assistant", "content": "b"}]})], max_seq_len=8)


def test_max_seq_len_check():
    assert check_max_seq_len(512, 8192) == 512
    assert check_max_seq_len(8192, 8192) == 8192
    assert check_max_seq_len(10**6, None) == 10**6
    with pytest.raises(ValueError, match="longer than the model can take .*max_position_embeddings=8192"):
        check_max_seq_len(8193, 8192)
    with pytest.raises(ValueError, match=">= 2"):
        check_max_seq_len(1)
    with pytest.raises(TypeError, match="must be an int"):
        check_max_seq_len(512.0)
    with pytest.raises(TypeError, match="must be an int"):
        check_max_seq_len(True)


def test_overflow_drop_and_error(smollm2_tokenizer):
    tok = smollm2_tokenizer
    short = Record(messages=({"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}), source="s")
    long = Record(
        messages=({"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "x"}), source="long:7"
    )
    n_short = len(tokenize_record(tok, short))
    exs, stats = tokenize_records(tok, [short, long, short], max_seq_len=n_short)
    assert [len(e) for e in exs] == [n_short, n_short]
    assert (stats.kept, stats.dropped_too_long, stats.dropped_sources) == (2, 1, ["long:7"])
    assert stats.trainable_tokens == 2 * exs[0].num_trainable and stats.longest > n_short
    with pytest.raises(DataFormatError, match=f"long:7: .* longer than max_seq_len={n_short}"):
        tokenize_records(tok, [short, long], max_seq_len=n_short, overflow="error")
    with pytest.raises(DataFormatError, match="no example fits max_seq_len=5"):
        tokenize_records(tok, [long], max_seq_len=5)
    with pytest.raises(ValueError, match="overflow must be"):
        tokenize_records(tok, [short], max_seq_len=64, overflow="truncate")


def test_no_trainable_tokens_raises(smollm2_tokenizer):
    # a template that never renders assistant turns leaves nothing to train on
    template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    rec = parse_record({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "x"}]})
    with pytest.raises(DataFormatError, match="no trainable tokens"):
        tokenize_records(smollm2_tokenizer, [rec], max_seq_len=64, chat_template=template)


# Hand-written templates in the shapes of other families (header + end-of-turn token; [INST] with the reply
# straight after the user turn; turns named "model"), none of them SmolLM's.
_TEMPLATES = {
    "header": (
        "<|begin|>{% for m in messages %}<|hdr|>{{ m['role'] }}<|/hdr|>\n\n{{ m['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|hdr|>assistant<|/hdr|>\n\n{% endif %}",
        "<|eot|>",
    ),
    "inst": (
        "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}",
        "</s>",
    ),
    "turns": (
        "{% for m in messages %}<turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end>\n{% endfor %}{% if add_generation_prompt %}<turn>model\n{% endif %}",
        "<end>",
    ),
}


@pytest.mark.parametrize("style", sorted(_TEMPLATES))
def test_other_template_shapes(tiny_tokenizer, style):
    template, end = _TEMPLATES[style]
    msgs = [
        {"role": "user", "content": "Add the two numbers."},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "The answer is"},
        {"role": "assistant", "content": "system 7"},
    ]
    ex = tokenize_chat(tiny_tokenizer, msgs, chat_template=template)
    assert tiny_tokenizer.decode(ex.input_ids) == tiny_tokenizer.apply_chat_template(
        msgs, tokenize=False, chat_template=template
    )
    assert _trained_runs(tiny_tokenizer, ex) == ["42" + end, "system 7" + end]
