"""Exact-match evaluation of a causal LM on a task split: batched greedy generation.

Each prompt is rendered with the chat template (generation prompt appended), a batch is left-padded (so
every row's last prompt token sits at the same position and generation continues from it), and the model
generates greedily until its end-of-sequence token or `max_new_tokens`. The reply's first line is the
answer (`quickloris.data.tasks.extract_answer`), compared to the reference exactly.

`max_new_tokens` defaults to the longest reference answer plus a few tokens of slack: an answer followed
by more text on the same line must be seen as wrong, so generation has to run past the answer's length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from quickloris.data.tasks import TaskExample, exact_match, get_task

_SLACK_TOKENS = 4


@dataclass
class EvalResult:
    """Accuracy over `total` problems, with the first few predictions for a human to read."""

    accuracy: float
    correct: int
    total: int
    seconds: float
    max_new_tokens: int
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "seconds": round(self.seconds, 3), "max_new_tokens": self.max_new_tokens, "samples": self.samples}


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return int(pad)


@torch.no_grad()
def generate_replies(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], *,
                     max_new_tokens: int, batch_size: int = 64, chat_template: str | None = None) -> list[str]:
    """Greedy replies (decoded, special tokens dropped) to chat `prompts`, `batch_size` at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; pass chat_template=...")
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True,
                                                   chat_template=chat_template)
                     for p in prompts[start:start + batch_size]]
            enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for row, e in enumerate(enc):  # left padding: the prompts end together, generation starts together
                ids[row, width - len(e):] = torch.tensor(e)
                mask[row, width - len(e):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            new = out[:, width:].cpu()
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return replies


def evaluate_exact_match(model: Any, tokenizer: Any, examples: Sequence[TaskExample], *, batch_size: int = 64,
                         max_new_tokens: int | None = None, num_samples: int = 5,
                         scorer: Callable[[str, str], bool] = exact_match,
                         chat_template: str | None = None) -> EvalResult:
    """Exact-match accuracy of greedy replies on `examples` (the held-out split of a task, usually)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    if max_new_tokens is None:
        longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
        max_new_tokens = longest + _SLACK_TOKENS
    t0 = time.perf_counter()
    replies = generate_replies(model, tokenizer, [ex.prompt_messages() for ex in examples],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template)
    seconds = time.perf_counter() - t0
    hits = [bool(scorer(r, ex.answer)) for r, ex in zip(replies, examples)]
    samples = [{"question": ex.question, "answer": ex.answer, "reply": r, "correct": h}
               for ex, r, h in list(zip(examples, replies, hits))[:num_samples]]
    return EvalResult(sum(hits) / len(hits), sum(hits), len(hits), seconds, max_new_tokens, samples)


def evaluate_task(model: Any, tokenizer: Any, task: str, *, n: int = 200, seed: int = 0, **kwargs: Any) -> EvalResult:
    """Exact-match accuracy on `n` held-out problems of the embedded task `task`."""
    return evaluate_exact_match(model, tokenizer, get_task(task).generate("heldout", n, seed), **kwargs)
