"""The eval bar counts problems: a row when it emits an end-of-sequence token, the rows cut by max_new_tokens
when their batch ends; nothing is streamed when the bar is hidden."""

from __future__ import annotations

import torch

from quickloris.data.tasks import get_task
from quickloris.train import exact_match
from quickloris.train.exact_match import _answered, generate_replies


class Recorder:
    """Stands in for the tqdm bar: records each update."""

    def __init__(self, disable: bool = False):
        self.disable, self.updates, self.closed = disable, [], False

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed = True


def test_streamer_counts_rows_as_they_finish():
    bar = Recorder()
    s = _answered(bar, [2, 5])
    s.put(torch.tensor([[7, 8, 9], [1, 1, 9], [3, 4, 9]]))  # the prompts: nothing answered yet
    s.put(torch.tensor([2, 7, 1]))  # row 0 ends
    s.put(torch.tensor([2, 5, 1]))  # row 0 pads with an EOS id (already counted), row 1 ends
    s.put(torch.tensor([2, 2, 4]))
    s.end()  # row 2 ran out of tokens
    assert bar.updates == [1, 1, 0, 1]
    single = Recorder()
    one = _answered(single, 5)  # a generation config's single int
    one.put(torch.tensor([[1, 2]]))
    one.put(torch.tensor([5]))
    one.end()
    assert single.updates == [1, 0]


def _run(model, tokenizer, monkeypatch, eos, *, disable=False):
    bars: list[Recorder] = []
    monkeypatch.setattr(exact_match, "progress", lambda **kw: bars.append(Recorder(disable)) or bars[-1])
    model.generation_config.eos_token_id = eos
    prompts = [ex.prompt_messages() for ex in get_task("addition").generate("heldout", 5, seed=3)]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    assert len(replies) == 5 and len(bars) == 1 and bars[0].closed
    return bars[0].updates


def test_generate_feeds_the_bar(tiny_llama, chat_tokenizer, monkeypatch):
    """Through `generate` itself: every token an EOS, each row is done at the first step; no EOS, at the end."""
    saved = tiny_llama.generation_config.eos_token_id
    try:
        every = list(range(len(chat_tokenizer)))
        assert _run(tiny_llama, chat_tokenizer, monkeypatch, every) == [3, 0, 2, 0]  # batches of 3 and 2
        assert _run(tiny_llama, chat_tokenizer, monkeypatch, None) == [0, 0, 0, 0, 3] + [0, 0, 0, 0, 2]  # 4 tokens
        assert _run(tiny_llama, chat_tokenizer, monkeypatch, None, disable=True) == []  # no streamer
    finally:
        tiny_llama.generation_config.eos_token_id = saved
