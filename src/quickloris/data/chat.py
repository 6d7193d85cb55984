"""Tokenize records and build response-only labels (prompt tokens masked to -100).

Chat records are rendered with the tokenizer's chat template. Which characters belong to an assistant
turn is found by rendering prefixes of the conversation, not by searching for role markers, so it works
for any template that renders prefixes consistently:

    P_i = render(messages[:i], add_generation_prompt=True)    # context up to turn i's content
    E_i = render(messages[:i + 1])                            # ... plus turn i and its end-of-turn marker
    R   = render(messages)                                    # the full conversation
Turn i is trained on the characters ``R[len(P_i):len(E_i.rstrip())]``: its content and the end-of-turn marker, so the
model learns to stop (whitespace after the marker is never generated, so not trained). That needs ``E_i`` to start
with ``P_i`` and ``R`` to start with ``E_i``, which is checked: a template that rewrites earlier turns (e.g. one
dropping past reasoning) fails the check and raises. ``R`` is tokenized once (so the ids are exactly the template's
tokenization), and a token is trained iff its first character lies in a trained span (token offsets from a fast
tokenizer). A reply that starts with whitespace can have it merged into the token ending the template's assistant
header (e.g. ``"\n "``); that token starts before the span and stays context.

Tool calling: a record's ``tools`` are passed to the template (``tools=``) in every render, and assistant turns with
``tool_calls`` are located the same way, so what the assistant writes is trained (the call text the template makes of
name and arguments, and the final answers) while the tool schemas, the system prompt and the ``tool`` results are
context. A template that leaves tools, calls or results out is refused (`quickloris.data.tools.check_tool_rendering`)
rather than training on a conversation with them missing.

Plain-text records (``prompt`` + ``completion`` strings) are tokenized as ``prompt + completion`` without a
template and without a separator (TRL's convention: the data holds the space or newline it wants); the tokens
starting inside the completion are trained, and the end-of-sequence token is appended (trained) so the model
learns to stop, unless the completion already ends with it (as TRL). Text records (language modelling) are
tokenized the same way with every token trained.

Labels are not shifted here: ``labels[t]`` is the token at position ``t`` and the loss (Hugging Face
convention) predicts ``labels[t + 1]`` from the logits at ``t``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from quickloris.data.jsonl import DataFormatError, Record
from quickloris.data.tools import (
    check_tool_rendering,
    is_tool_message,
    renders_tools,
    tool_template,
    tool_template_path,
)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one record (``labels[t]`` is ``input_ids[t]`` or -100)."""

    input_ids: list[int]
    labels: list[int]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{self.source}: input_ids has {len(self.input_ids)} tokens but labels {len(self.labels)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trainable(self) -> int:
        """Tokens the loss sees; the first token is never predicted (nothing precedes it)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    """What `tokenize_records` kept and dropped."""

    records: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    longest: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    dropped_sources: list[str] = field(default_factory=list)


def check_max_seq_len(max_seq_len: Any, max_position_embeddings: int | None = None) -> int:
    """Validate `max_seq_len` against the model's position limit (None: limit unknown, not checked)."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
        raise TypeError(f"max_seq_len must be an int, got {type(max_seq_len).__name__}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 (one token to read, one to predict), got {max_seq_len}")
    if max_position_embeddings is not None and max_seq_len > max_position_embeddings:
        raise ValueError(
            f"max_seq_len={max_seq_len} is longer than the model can take "
            f"(max_position_embeddings={max_position_embeddings}); use at most that"
        )
    return max_seq_len


def _offsets(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers cannot map tokens back to characters
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} gives no token offsets; response-only "
            "masking needs a fast (Rust `tokenizers`) tokenizer"
        ) from None
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if ids and isinstance(ids[0], list):
        raise TypeError("tokenizer returned a batch for a single string")
    return ids, offs


def _labels_from_spans(
    ids: list[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    return [i if any(a <= start < b for a, b in spans) else IGNORE_INDEX for i, (start, _) in zip(ids, offsets)]


_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def template_message(m: Mapping[str, Any]) -> dict[str, Any]:
    """A message as the chat template sees it: quickloris' own keys (``train``) dropped, tool keys only when set
    (Llama-3.1's template branches on ``'tool_calls' in message``)."""
    return {k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None}


def _render(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    generation_prompt: bool,
    chat_template: str | None,
    source: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    extra = {"tools": [dict(t) for t in tools]} if tools else {}
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=chat_template,
            **extra,
        )
    except Exception as e:  # jinja errors (raise_exception in templates) carry the template's own message
        raise DataFormatError(f"{source}: the chat template failed on this conversation: {e}") from e
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def require_chat_template(tokenizer: Any, chat_template: str | None = None) -> None:
    """Raise if neither `chat_template` nor the tokenizer provides a chat template."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no "
            "chat template, so chat 'messages' cannot be rendered; pass chat_template=... "
            "or use prompt/completion text records"
        )


def template_renders_tools(tokenizer: Any, chat_template: str | None = None) -> bool:
    """Whether `chat_template` (None: the tokenizer's) renders tools, calls and results (`quickloris.data.tools.
    renders_tools`)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        return False
    return renders_tools(lambda msgs, gen, tools: _render(tokenizer, msgs, gen, chat_template, "probe", tools))


def tool_task_template(tokenizer: Any, chat_template: str | None) -> tuple[str | None, str | None]:
    """The chat template of the embedded tool-calling task and a note for the user: `chat_template` (--chat-template)
    when given, else the model's own when it renders tools, else quickloris' ChatML tool template for a ChatML model
    (with a note saying so); a model with neither raises (one line naming --chat-template)."""
    if chat_template is not None or template_renders_tools(tokenizer):
        return chat_template, None
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return tool_template(), (
            "the model's chat template cannot render tools: --task tools uses quickloris' ChatML tool template "
            f"({tool_template_path()}) for training and evaluation (`quickloris export gguf --adapter` stores it in "
            "the GGUF file)"
        )
    raise ValueError(
        "--task tools: the model's chat template cannot render tools and the model does not use ChatML (for which "
        f"quickloris ships one: {tool_template_path()}); pass a template that renders tools with --chat-template FILE"
    )


def tokenize_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    source: str = "<memory>",
    chat_template: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> TokenizedExample:
    """Render `messages` (and `tools`) with the chat template; train every assistant turn (unless it has
    ``train=False``)."""
    require_chat_template(tokenizer, chat_template)
    clean = [template_message(m) for m in messages]

    def render(msgs: Sequence[Mapping[str, Any]], generation_prompt: bool, tools: Any) -> str:
        return _render(tokenizer, msgs, generation_prompt, chat_template, source, tools)

    full = render(clean, False, tools)
    spans: list[tuple[int, int]] = []
    turns: dict[int, tuple[int, int]] = {}  # assistant turns with tool calls, for the tool rendering check
    for i, m in enumerate(messages):
        trained = m["role"] == "assistant" and m.get("train", True)
        if not trained and not clean[i].get("tool_calls"):
            continue
        prefix = render(clean[:i], True, tools)
        upto = render(clean[: i + 1], False, tools)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise DataFormatError(
                f"{source}: the chat template does not render conversation prefixes consistently (turn {i}: "
                "rendering the conversation up to this turn is not a prefix of the full rendering), so the "
                "assistant tokens cannot be located; use a template that renders prefixes consistently"
            )
        # Whitespace the template puts after the end-of-turn marker is not trained: generation stops at the
        # marker, so it is never produced.
        end = len(upto.rstrip())
        turns[i] = (len(prefix), end)
        if trained and end > len(prefix):
            spans.append((len(prefix), end))
    if tools or any(is_tool_message(m) for m in clean):
        check_tool_rendering(render, clean, tools, turns, full, source)
    ids, offsets = _offsets(tokenizer, full, add_special_tokens=False)
    return TokenizedExample(ids, _labels_from_spans(ids, offsets, spans), source)


def _post_processor_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before any text when ``add_special_tokens=True`` (e.g. BOS)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for k in range(len(with_special) - len(bare) + 1):
        if with_special[k : k + len(bare)] == bare:
            return with_special[:k]
    return []


def tokenize_text(tokenizer: Any, prompt: str, completion: str, *, source: str = "<memory>") -> TokenizedExample:
    """``prompt + completion`` as plain text; trains the completion tokens and an appended EOS."""
    text = prompt + completion
    ids, offsets = _offsets(tokenizer, text, add_special_tokens=False)
    labels = _labels_from_spans(ids, offsets, [(len(prompt), len(text))])
    head = _post_processor_prefix(tokenizer)
    ids, labels = head + ids, [IGNORE_INDEX] * len(head) + labels
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids[-1:] != [eos]:
        ids, labels = ids + [eos], labels + [eos]
    return TokenizedExample(ids, labels, source)


def tokenize_lm(tokenizer: Any, text: str, *, source: str = "<memory>") -> TokenizedExample:
    """Language modelling: `text` with the tokenizer's prefix (e.g. BOS) and an appended EOS, every token a label
    (the first is never predicted, so its label does not count)."""
    ex = tokenize_text(tokenizer, "", text, source=source)
    return TokenizedExample(ex.input_ids, list(ex.input_ids), source)


def tokenize_record(tokenizer: Any, record: Record, *, chat_template: str | None = None) -> TokenizedExample:
    if record.is_chat:
        return tokenize_chat(
            tokenizer, record.messages, source=record.source, chat_template=chat_template, tools=record.tools
        )
    if record.text is not None:
        return tokenize_lm(tokenizer, record.text, source=record.source)
    return tokenize_text(tokenizer, record.prompt, record.completion, source=record.source)


def tokenize_records(
    tokenizer: Any,
    records: Sequence[Record],
    *,
    max_seq_len: int,
    overflow: Literal["drop", "error"] = "drop",
    chat_template: str | None = None,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize all records; examples longer than `max_seq_len` are dropped (counted) or raise.

    Truncating instead would cut responses (or all of them, leaving nothing to train), so it is not done.
    Raises `DataFormatError` when nothing is left to train on.
    """
    check_max_seq_len(max_seq_len)
    if overflow not in ("drop", "error"):
        raise ValueError(f"overflow must be 'drop' or 'error', got {overflow!r}")
    if any(r.is_chat for r in records):
        require_chat_template(tokenizer, chat_template)
    stats = TokenizeStats(records=len(records))
    out = []
    for r in records:
        ex = tokenize_record(tokenizer, r, chat_template=chat_template)
        stats.longest = max(stats.longest, len(ex))
        if len(ex) > max_seq_len:
            if overflow == "error":
                raise DataFormatError(
                    f"{r.source}: {len(ex)} tokens, longer than max_seq_len={max_seq_len} "
                    "(raise max_seq_len or use overflow='drop')"
                )
            stats.dropped_too_long += 1
            stats.dropped_sources.append(r.source)
            continue
        out.append(ex)
    stats.kept = len(out)
    stats.tokens = sum(map(len, out))
    stats.trainable_tokens = sum(map(operator.attrgetter("num_trainable"), out))
    if not out:
        raise DataFormatError(
            f"no example fits max_seq_len={max_seq_len} (the longest has {stats.longest} tokens)"
            if records
            else "no records to tokenize"
        )
    if stats.trainable_tokens == 0:
        raise DataFormatError(
            f"the dataset has no trainable tokens ({stats.kept} examples, {stats.tokens} tokens, "
            "all masked): check that the records have assistant turns / completions"
        )
    return out, stats
