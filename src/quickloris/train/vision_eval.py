"""Held-out evaluation of a vision-language model: the text path's exact match with images in the prompts.

Problems: the rows of an ``--eval-data`` file in the format of a VLM's ``--data`` (`quickloris.data.vision`: image
parts name local files relative to the file), each ending with a one-line reference assistant answer - the text
path's rules (`quickloris.train.runtime.reference_answer`) - or the held-out split of an embedded visual task
(`quickloris.data.vision_tasks`). Each prompt (the messages before the answer, rendered with the generation prompt,
every image placeholder expanded to the image's tokens: `quickloris.data.vision.prompt_example`) is continued
greedily, ``--eval-batch-size`` prompts at a time (left padded, as the text path's: the prompts end together; their
images in row order, a text-only row beside image rows), up to the EOS token or
``max_new_tokens`` - by default the longest reference answer's token count + 4, as for text
(`quickloris.train.exact_match.max_new_tokens_for`). The reply's first line is compared with the answer exactly
(`quickloris.data.tasks.exact_match`). The result is the text path's `EvalResult` dict, printed as text's is
(`quickloris.train.tool_eval.echo_eval`): `quickloris train` and `quickloris eval` report a VLM as they report text.

`quickloris eval` on a VLM is `quickloris.train.evaluation.run_eval` with branches taken from here -
`vision_problems` (an adapter with LoRA on the vision tower loads as any other: `prepare_model`) - and from
`quickloris.train.vision` (`check_vision_eval`: options that do not apply, one line each; the model and its image
processing, as training loads them).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from quickloris.config import ConfigError
from quickloris.data.errors import DataFormatError
from quickloris.data.tasks import exact_match
from quickloris.train.config import EvalConfig


@dataclasses.dataclass(frozen=True)
class VisionEvalExample:
    """A held-out conversation of an --eval-data file: the prompt messages (image parts as ``{"type": "image"}``),
    their image files in order, and the reference answer."""

    prompt: tuple[dict[str, Any], ...]
    images: tuple[Any, ...]
    answer: str
    source: str

    @property
    def question(self) -> str:
        users = [m for m in self.prompt if m["role"] == "user"] or list(self.prompt)
        return _text(users[-1]["content"])

    def prompt_messages(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.prompt]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else "<image>" for p in content)


def read_vision_eval(path: str) -> list[VisionEvalExample]:
    """The problems of a VLM --eval-data file; a bad row (a missing image, no final one-line assistant answer, ...)
    is one line naming --eval-data and file:line (`ConfigError`)."""
    from quickloris.data.vision import read_vision_jsonl
    from quickloris.train.runtime import reference_answer

    try:
        out = []
        for r in read_vision_jsonl(path):
            *prompt, last = r.messages
            answer = reference_answer([*prompt, {**last, "content": _text(last["content"])}], r.source)
            out.append(VisionEvalExample(tuple(prompt), r.images, answer, r.source))
        return out
    except (DataFormatError, FileNotFoundError) as e:
        raise ConfigError(EvalConfig, "eval_data", f": {e}") from None


def vision_problems(
    eval_data: str | None, visual_task: str | None, num_eval: int, seed: int, image_task_size: int
) -> tuple[list, str]:
    """(problems, what they are): the --eval-data file's, else the visual task's held-out split, else none."""
    if eval_data is not None:
        return read_vision_eval(eval_data), f"--eval-data {eval_data}"
    if visual_task is not None:
        from quickloris.data.vision_tasks import visual_problems

        problems = visual_problems(visual_task, "heldout", num_eval, seed, image_task_size)
        return problems, f"{len(problems)} held-out problems of visual task {visual_task!r}"
    return [], "no evaluation: training on --data without --eval-data"


# token-aligned tensors of a padded VLM batch ([B, S, ...]): moved together when the padding moves to the left
_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "cross_attention_mask")


def left_padded(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` (right padded, `quickloris.data.vision.collate_vision`) with each row's padding moved to its left:
    generation appends after the last column, so every prompt must end there. Pixel tensors are per image (or per
    row, Mllama) and do not move."""
    lengths = batch["attention_mask"].sum(1).tolist()
    width = batch["input_ids"].shape[1]
    out = dict(batch)
    for key in _ALIGNED:
        if key in batch:
            t = batch[key].clone()
            for row, n in enumerate(lengths):
                t[row] = torch.roll(batch[key][row], shifts=width - int(n), dims=0)
            out[key] = t
    return out


@torch.no_grad()
def generate_vision_replies(
    model: Any,
    processing: Any,
    problems: list,
    *,
    max_new_tokens: int,
    chat_template: str | None,
    image_max_size: int | None,
    batch_size: int = 1,
) -> list[str]:
    """Greedy replies (decoded, special tokens dropped) to each problem's prompt and images, `batch_size` prompts
    at a time (left padded)."""
    from quickloris.data.vision import collate_vision, prompt_example
    from quickloris.models.vision import vision_parameters
    from quickloris.utils.progress import progress

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tok = processing.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    # use_cache: prepare_model turns the KV cache off for training; generation needs it
    greedy = {"do_sample": False, "num_beams": 1, "use_cache": True, "pad_token_id": pad}

    def generate(examples) -> list[str]:
        batch = collate_vision(processing, examples, packing=False, pad_token_id=pad, image_max_size=image_max_size)
        batch.pop("labels")
        batch.pop("image_rows", None)  # transformers' own layout: every image of the batch, in row order
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in left_padded(batch).items()}
        if "pixel_values" in batch:  # the image processor's fp32 pixels, in the vision tower's dtype
            batch["pixel_values"] = batch["pixel_values"].to(vision_parameters(model)[0].dtype)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **greedy)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    replies: list[str] = []
    with progress(total=len(problems), desc="eval", unit="problem") as bar:
        for start in range(0, len(problems), batch_size):
            examples = [
                prompt_example(
                    processing,
                    p.prompt_messages(),
                    p.images,
                    chat_template=chat_template,
                    image_max_size=image_max_size,
                )
                for p in problems[start : start + batch_size]
            ]
            # Mllama's pixel values are per row ([B, images, tiles, ...]; the collation holds them only for rows with
            # images, padded to the most images of a row). In transformers' Mllama a token before the row's first
            # image has every key masked, so its cross-attention is the plain average over all image slots, padding
            # slots included (only the layer's MLP output is masked for it): a row's logits depend on the other
            # rows' image counts (0.06 on a tiny model). Rows are batched with rows of as many images, replies
            # kept in order, so each reply is the one-prompt reply.
            groups = [list(range(len(examples)))]
            if processing.kind == "mllama":
                counts = sorted({len(e.images) for e in examples})
                groups = [[i for i, e in enumerate(examples) if len(e.images) == c] for c in counts]
            got: dict[int, str] = {}
            for group in filter(None, groups):
                got.update(zip(group, generate([examples[i] for i in group])))
            replies += [got[i] for i in range(len(examples))]
            bar.update(len(examples))
    return replies


def evaluate_vision(
    model: Any,
    processing: Any,
    problems: list,
    *,
    chat_template: str | None,
    image_max_size: int | None,
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    label: str = "",
    echo=print,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy replies to `problems` (`VisionEvalExample` or visual-task problems), as the
    text path's result dict; printed with a few replies as text's."""
    from quickloris.train.exact_match import max_new_tokens_for, score_replies
    from quickloris.train.runtime import eager_regions
    from quickloris.train.tool_eval import echo_eval

    n = max_new_tokens_for(processing.tokenizer, problems, max_new_tokens, chat_template)
    render = {"chat_template": chat_template, "image_max_size": image_max_size}
    training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with eager_regions():
            replies = generate_vision_replies(
                model, processing, problems, max_new_tokens=n, batch_size=batch_size, **render
            )
    finally:
        model.train(training)
    result = score_replies(problems, replies, time.perf_counter() - t0, n, 3, exact_match).to_dict()
    echo_eval(echo, label, result)
    return result


__all__ = [
    "VisionEvalExample",
    "evaluate_vision",
    "generate_vision_replies",
    "left_padded",
    "read_vision_eval",
    "vision_problems",
]
