"""Embedded visual tasks: images drawn on the fly (PIL), a question, a one-word answer scored by exact match.

* ``dots``: how many dots (1-6) are in the picture; dots of one random colour at random non-overlapping places.
* ``shapes``: which shape is in the picture - circle, square or triangle - at a random place, size and colour.
* ``colors``: the colour of the one shape - red, green, blue, yellow, white or purple.

Each problem is drawn from a seeded RNG: its layout (the shape or dots, places, sizes, background) is its key, and
`quickloris.data.tasks.split_of` puts it on the train or held-out side by that key, so the two splits never share
a picture, for every seed (`quickloris.data.tasks.draw_split`). Images are ``size`` x ``size`` RGB (default 56).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from quickloris.data.tasks import Split, draw_split
from quickloris.data.vision import VisionRecord

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 20),
    "white": (245, 245, 245),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "dots": "How many dots are in the picture? Answer with a number.",
    "shapes": "Which shape is in the picture: circle, square or triangle?",
    "colors": "What colour is the shape? Answer with one word.",
}
VISUAL_TASKS = tuple(QUESTIONS)


@dataclasses.dataclass(frozen=True)
class VisualProblem:
    image: Any
    question: str
    answer: str
    source: str

    def record(self) -> VisionRecord:
        content = [{"type": "image"}, {"type": "text", "text": self.question}]
        messages = ({"role": "user", "content": content}, {"role": "assistant", "content": self.answer})
        return VisionRecord(messages, (self.image,), self.source)

    @property
    def images(self) -> tuple[Any, ...]:
        return (self.image,)

    def prompt_messages(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 60) for _ in range(3))  # dark: every colour of COLORS shows on it


def _sample(task: str, size: int):
    def sample(rng: random.Random) -> tuple:
        bg = _background(rng)
        if task == "dots":
            n, r = rng.randint(1, 6), max(2, size // 16)
            cells = rng.sample(range((size // (3 * r)) ** 2), n)  # one dot per grid cell: they never touch
            g = size // (3 * r)
            centres = tuple((c % g * 3 * r + r + 1, c // g * 3 * r + r + 1) for c in cells)
            return ("dots", str(n), bg, rng.choice(list(COLORS)), r, centres)
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLORS))
        s = rng.randint(size // 3, size * 2 // 3)
        x, y = rng.randint(0, size - s - 1), rng.randint(0, size - s - 1)
        answer = shape if task == "shapes" else colour
        return (task, answer, bg, colour, shape, (x, y, s))

    return sample


def _draw(item: tuple, size: int):
    from PIL import Image, ImageDraw

    task, _, bg, colour, *rest = item
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    fill = COLORS[colour]
    if task == "dots":
        r, centres = rest
        for cx, cy in centres:
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return img
    shape, (x, y, s) = rest
    if shape == "circle":
        d.ellipse((x, y, x + s, y + s), fill=fill)
    elif shape == "square":
        d.rectangle((x, y, x + s, y + s), fill=fill)
    else:
        d.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return img


def visual_problems(task: str, split: Split, n: int, seed: int, size: int = 56) -> list[VisualProblem]:
    """`n` problems of `task` on `split` (disjoint splits; the same list for the same arguments)."""
    if task not in QUESTIONS:
        raise ValueError(f"{task!r} is not a visual task; choose one of {', '.join(VISUAL_TASKS)}")
    items = draw_split(f"visual-{task}", split, n, seed, _sample(task, size), distinct=repr, key=repr)
    return [
        VisualProblem(_draw(it, size), QUESTIONS[task], it[1], f"visual task {task!r} {split} #{i}")
        for i, it in enumerate(items)
    ]


__all__ = ["VISUAL_TASKS", "VisualProblem", "visual_problems"]
