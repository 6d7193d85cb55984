"""Exact-match evaluation of a causal LM on a task split: batched greedy generation.

Each prompt is rendered with the chat template (generation prompt appended), a batch is left-padded (so
every row's last prompt token sits at the same position and generation continues from it), and the model
generates greedily until its end-of-sequence token or `max_new_tokens`. The reply's first line is the
answer (`quickloris.data.tasks.extract_answer`), compared to the reference exactly.

`max_new_tokens` defaults to the longest reference answer plus a few tokens of slack: an answer followed
by more text on the same line must be seen as wrong, so generation has to run past the answer's length.

`evaluate_exact_match_gguf` scores a GGUF file the same way through llama.cpp (llama-cpp-python): the same
prompt token ids (rendered and tokenized by the HF tokenizer), greedy decoding as the first index of the largest
logit (what ``torch.argmax`` picks, and HF's greedy search), the same stop tokens (the HF model's EOS ids), the
same decoding of the reply and the same exact-match rule. Prompts run one at a time (no padding), with an F32
KV cache so the number measures the file's weights rather than llama.cpp's default F16 cache rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from quickloris.data.tasks import TaskExample, exact_match, get_task
from quickloris.data.tool_task import ToolExample
from quickloris.utils.progress import progress

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
    details: dict[str, Any] = field(default_factory=dict)  # more scores (the tool task's: call and final answer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "seconds": round(self.seconds, 3),
            "max_new_tokens": self.max_new_tokens,
            **self.details,
            "samples": self.samples,
        }


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return int(pad)


Tools = Sequence[Sequence[dict[str, Any]] | None] | None  # per prompt: the function schemas rendered with it


def prompt_ids(
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, Any]]],
    chat_template: str | None = None,
    tools: Tools = None,
) -> list[list[int]]:
    """Token ids of each chat prompt, rendered with the chat template (and its `tools`) and the generation prompt
    appended."""
    from quickloris.data.chat import template_message

    per_prompt = list(tools) if tools is not None else [None] * len(prompts)
    texts = [
        tokenizer.apply_chat_template(
            [template_message(m) for m in p],
            tokenize=False,
            add_generation_prompt=True,
            chat_template=chat_template,
            **({"tools": [dict(x) for x in t]} if t else {}),
        )
        for p, t in zip(prompts, per_prompt)
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _answered(bar: Any, eos_ids: Any) -> Any:
    """A `generate` streamer that advances `bar` by each row of the batch as it emits an end-of-sequence token
    (rows cut by ``max_new_tokens``: when the batch ends). `generate` hands it the prompt, then each step's
    tokens, one per row."""
    from transformers.generation.streamers import BaseStreamer

    eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids or []), dtype=torch.long)

    class Answered(BaseStreamer):
        done = torch.zeros(0, dtype=torch.bool)

        def put(self, value: torch.Tensor) -> None:
            if value.dim() > 1:  # the prompt
                self.done = torch.zeros(value.shape[0], dtype=torch.bool)
                return
            new = torch.isin(value.view(-1), eos) & ~self.done
            self.done |= new
            bar.update(int(new.sum()))

        def end(self) -> None:
            bar.update(int((~self.done).sum()))

    return Answered()


@torch.no_grad()
def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    chat_template: str | None = None,
    tools: Tools = None,
) -> list[str]:
    """Greedy replies (decoded, special tokens dropped) to chat `prompts` (each rendered with its `tools`),
    `batch_size` at a time."""
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
    bar = progress(total=len(prompts), desc="eval", unit="problem")
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = None if tools is None else tools[start : start + batch_size]
            enc = prompt_ids(tokenizer, prompts[start : start + batch_size], chat_template, chunk)
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for row, e in enumerate(enc):  # left padding: the prompts end together, generation starts together
                ids[row, width - len(e) :] = torch.tensor(e)
                mask[row, width - len(e) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                streamer=None if bar.disable else _answered(bar, model.generation_config.eos_token_id),
            )
            new = out[:, width:].cpu()
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        bar.close()
        model.train(was_training)
    return replies


def evaluate_exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TaskExample],
    *,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    num_samples: int = 5,
    scorer: Callable[[str, str], bool] = exact_match,
    chat_template: str | None = None,
) -> EvalResult:
    """Exact-match accuracy of greedy replies on `examples` (the held-out split of a task, usually)."""
    max_new_tokens = max_new_tokens_for(tokenizer, examples, max_new_tokens, chat_template)
    t0 = time.perf_counter()
    replies = generate_replies(
        model,
        tokenizer,
        [ex.prompt_messages() for ex in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat_template=chat_template,
        tools=[getattr(ex, "tools", None) for ex in examples],
    )
    return score_replies(examples, replies, time.perf_counter() - t0, max_new_tokens, num_samples, scorer)


def max_new_tokens_for(
    tokenizer: Any, examples: Sequence[TaskExample], max_new_tokens: int | None, chat_template: str | None = None
) -> int:
    """`max_new_tokens`, or when None the longest reference answer's token count + a few (module docstring)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    if isinstance(examples[0], ToolExample):  # the call and the answer are scored apart: not one exact match
        raise TypeError("the tool task is scored by quickloris.train.tool_eval.evaluate_tool_calls")
    _check_tool_prompts(tokenizer, examples, chat_template)
    if max_new_tokens is None:
        longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
        max_new_tokens = longest + _SLACK_TOKENS
    return max_new_tokens


def _check_tool_prompts(tokenizer: Any, examples: Sequence[Any], chat_template: str | None) -> None:
    """--eval-data conversations with tools, calls or tool results: the template must render them (one line naming
    the row otherwise, as for training data), else the prompts would be scored with them silently left out."""
    from quickloris.data.chat import tokenize_chat
    from quickloris.data.tools import is_tool_message

    for ex in examples:
        tools = getattr(ex, "tools", None)
        prompt = ex.prompt_messages()
        if tools or any(is_tool_message(m) for m in prompt):
            messages = [*prompt, {"role": "assistant", "content": ex.answer}]
            tokenize_chat(tokenizer, messages, source=ex.source, chat_template=chat_template, tools=tools)


def score_replies(
    examples: Sequence[TaskExample],
    replies: list[str],
    seconds: float,
    max_new_tokens: int,
    num_samples: int,
    scorer: Callable[[str, str], bool],
) -> EvalResult:
    """Each reply scored against its example's answer; the first `num_samples` kept for a human to read."""
    hits = [bool(scorer(r, ex.answer)) for r, ex in zip(replies, examples)]
    samples = [
        {"question": ex.question, "answer": ex.answer, "reply": r, "correct": h}
        for ex, r, h in list(zip(examples, replies, hits))[:num_samples]
    ]
    return EvalResult(sum(hits) / len(hits), sum(hits), len(hits), seconds, max_new_tokens, samples)


def evaluate_task(model: Any, tokenizer: Any, task: str, *, n: int = 200, seed: int = 0, **kwargs: Any) -> EvalResult:
    """Exact-match accuracy on `n` held-out problems of the embedded task `task`."""
    return evaluate_exact_match(model, tokenizer, get_task(task).generate("heldout", n, seed), **kwargs)


def generate_replies_gguf(
    path: str,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    chat_template: str | None = None,
    threads: int | None = None,
    tools: Tools = None,
) -> tuple[list[str], int]:
    """Greedy replies of the GGUF model `path` through llama.cpp, and how many prompts llama.cpp's own tokenizer
    splits differently from `tokenizer` (0 when the file carries the same tokenizer; the replies always start from
    `tokenizer`'s ids)."""
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        raise ModuleNotFoundError("scoring a GGUF file needs llama-cpp-python: pip install llama-cpp-python") from None
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    ids = prompt_ids(tokenizer, prompts, chat_template, tools)
    stops = {int(t) for t in stop_ids}
    n_ctx = max(map(len, ids)) + max_new_tokens
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        type_k=0,
        type_v=0,
        verbose=False,
    )  # type 0 = F32 KV cache
    try:
        n_vocab = llm.n_vocab()
        retokenized = 0
        replies = []
        for prompt in progress(ids, desc="eval GGUF", unit="problem"):
            text = tokenizer.decode(prompt)
            retokenized += llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != prompt
            llm.reset()
            llm.eval(prompt)
            new: list[int] = []
            while True:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
                token = int(np.argmax(logits))  # the first largest logit, as torch.argmax / HF greedy search
                new.append(token)
                if token in stops or len(new) == max_new_tokens:
                    break
                llm.eval([token])
            replies.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        llm.close()
    return replies, retokenized


def evaluate_exact_match_gguf(
    path: str,
    tokenizer: Any,
    examples: Sequence[TaskExample],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int | None = None,
    num_samples: int = 5,
    scorer: Callable[[str, str], bool] = exact_match,
    chat_template: str | None = None,
    threads: int | None = None,
) -> tuple[EvalResult, int]:
    """`evaluate_exact_match` for a GGUF file run by llama.cpp (see the module docstring); also returns the count
    of prompts llama.cpp's tokenizer splits differently."""
    max_new_tokens = max_new_tokens_for(tokenizer, examples, max_new_tokens, chat_template)
    t0 = time.perf_counter()
    replies, retokenized = generate_replies_gguf(
        path,
        tokenizer,
        [ex.prompt_messages() for ex in examples],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        chat_template=chat_template,
        threads=threads,
        tools=[getattr(ex, "tools", None) for ex in examples],
    )
    return score_replies(examples, replies, time.perf_counter() - t0, max_new_tokens, num_samples, scorer), retokenized
