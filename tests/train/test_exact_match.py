"""Exact-match evaluation: batched left-padded greedy generation == one prompt at a time; scoring is exact."""

from __future__ import annotations

import pytest
import torch

from quickloris.data.tasks import TaskExample, get_task
from quickloris.train.exact_match import evaluate_exact_match, evaluate_task, generate_replies


def test_batched_left_padded_equals_one_by_one(tiny_llama, chat_tokenizer, seed):
    """Prompts of different lengths in one batch (left padding) reply exactly as when generated alone."""
    examples = get_task("reverse").generate("heldout", 7, seed=seed % 10_000)  # 5-7 digits: lengths differ
    prompts = [ex.prompt_messages() for ex in examples]
    batched = generate_replies(tiny_llama, chat_tokenizer, prompts, max_new_tokens=6, batch_size=4)
    alone = []
    for p in prompts:
        ids = chat_tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
        out = tiny_llama.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=chat_tokenizer.pad_token_id
        )
        alone.append(chat_tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    assert batched == alone
    assert (
        len(set(map(len, (chat_tokenizer.apply_chat_template(p, tokenize=True, return_dict=False) for p in prompts))))
        > 1
    )  # the batch really needed padding


class OracleModel(torch.nn.Module):
    """Answers a prompt from a lookup table; checks the batch is left-padded the way generation needs."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.replies, self.calls = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kw):
        assert kw["do_sample"] is False and not self.training
        assert (attention_mask[:, -1] == 1).all()  # every prompt ends at the last column
        assert (attention_mask.cumsum(1).clamp(max=1) == attention_mask).all()  # zeros only on the left
        self.calls.append(input_ids.shape)
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()])
            reply = self.tok(self.replies[prompt], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            reply = (reply + [pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(reply)]))
        return torch.stack(rows)


def test_scoring_with_an_oracle(chat_tokenizer):
    tok = chat_tokenizer
    examples = get_task("addition").generate("heldout", 10, seed=1)
    replies = {}
    for k, ex in enumerate(examples):
        prompt = tok.apply_chat_template(ex.prompt_messages(), tokenize=False, add_generation_prompt=True)
        # right / right with a second line / wrong digit / right answer inside a sentence (wrong) / right + junk
        replies[prompt] = [
            ex.answer,
            ex.answer + "\n(sum)",
            str(int(ex.answer) + 1),
            "It is " + ex.answer,
            ex.answer + "0",
        ][k % 5]
    model = OracleModel(tok, replies).train()
    result = evaluate_exact_match(model, tok, examples, batch_size=4, num_samples=3)
    assert (result.correct, result.total, result.accuracy) == (4, 10, 0.4)
    assert model.training  # mode restored
    assert [c[0] for c in model.calls] == [4, 4, 2]
    longest = max(len(tok(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    assert result.max_new_tokens == longest + 4
    assert [s["correct"] for s in result.samples] == [True, True, False]
    assert result.samples[1]["reply"].startswith(examples[1].answer + "\n(")  # cut at max_new_tokens
    assert result.to_dict()["accuracy"] == 0.4


def test_evaluate_task_runs_on_a_real_model(tiny_llama, chat_tokenizer):
    result = evaluate_task(tiny_llama, chat_tokenizer, "addition", n=5, batch_size=5, max_new_tokens=3)
    assert result.total == 5 and 0.0 <= result.accuracy <= 1.0 and result.max_new_tokens == 3
    assert len(result.samples) == 5 and all(s["question"].count(" + ") == 1 for s in result.samples)


def test_bad_arguments(tiny_llama, chat_tokenizer):
    ex = [TaskExample("Add the two numbers.", "1 + 2", "3")]
    with pytest.raises(ValueError, match="no examples"):
        evaluate_exact_match(tiny_llama, chat_tokenizer, [])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_exact_match(tiny_llama, chat_tokenizer, ex, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        evaluate_exact_match(tiny_llama, chat_tokenizer, ex, max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_task(tiny_llama, chat_tokenizer, "nope")


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_llama, chat_tokenizer):
    """Generation on the GPU (inputs moved to the model's device) scores like the CPU run."""
    import copy

    examples = get_task("reverse").generate("heldout", 12, seed=5)
    cpu = evaluate_exact_match(tiny_llama, chat_tokenizer, examples, batch_size=5, max_new_tokens=6, num_samples=12)
    gpu_model = copy.deepcopy(tiny_llama).cuda()
    gpu = evaluate_exact_match(gpu_model, chat_tokenizer, examples, batch_size=5, max_new_tokens=6, num_samples=12)
    assert [s["reply"] for s in gpu.samples] == [s["reply"] for s in cpu.samples]
    assert gpu.accuracy == cpu.accuracy
