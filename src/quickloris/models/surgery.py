"""Every change quickloris makes to a model object goes through here and is recorded on the model.

A model quickloris has touched carries one visible attribute, ``model.quickloris_edits`` (an `Edits`):

* ``log``: the changes in the order they were made, each an `Edit` - the step that made it (``prepare``, ``loss``,
  ``attention``, ``checkpoint``, ``compile``, ``fsdp``), the target (``model.forward``,
  ``model.model.layers.3.forward``, ``model.hf_quantizer``, ...), what it does, and whether it can be undone;
* ``state``: what each step keeps (the QLoRA config, the loss's config and per-chunk function, the compile
  config, the FSDP2 plan).

``print(model.quickloris_edits)`` lists them; `undo(model, step)` reverts a step's edits, newest first. Attributes
are set on *this object* only (an instance ``forward`` shadows the class's; no class is patched), or through Hugging
Face's and PyTorch's own extension points (``set_attn_implementation``, ``gradient_checkpointing_enable``, forward
pre-hooks, ``module.compile``, ``fully_shard``), which are recorded with their undo where one exists. Edits that
cannot be undone (16-bit weights quantized and dropped, modules sharded) say so.

Records hold paths and values, not the model: a ``copy.deepcopy`` of a model copies its record along with it, and
bound methods in it are rebound to the copy as ``deepcopy`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

ATTR = "quickloris_edits"


class _Missing:
    """Marks "no instance attribute was there" in a record; one object, also in a deep copy of the record."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


@dataclasses.dataclass
class Edit:
    """One change: `step` set `target` (a path from the model) - `what` in words."""

    step: str
    target: str
    what: str
    # How to revert it: (owner path, attribute, previous value or _MISSING) for an attribute set here; a function
    # of the model for a change made through an HF / PyTorch API; None when it cannot be undone.
    restore: tuple[str, str, Any] | None = None
    undo_fn: Callable[[nn.Module], None] | None = None

    @property
    def undoable(self) -> bool:
        return self.restore is not None or self.undo_fn is not None


class Edits:
    """The record of a model's changes (see the module docstring)."""

    def __init__(self) -> None:
        self.log: list[Edit] = []
        self.state: dict[str, Any] = {}

    def steps(self) -> list[str]:
        """The steps applied, in order (each once)."""
        return list(dict.fromkeys(e.step for e in self.log))

    def __repr__(self) -> str:
        lines = [f"quickloris edits ({len(self.log)}):"]
        lines += [f"  {e.step:<10} {e.target:<45} {e.what}{'' if e.undoable else '  [permanent]'}" for e in self.log]
        return "\n".join(lines)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT and other wrappers exposing ``get_base_model()``."""
    for _ in range(4):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if inner is model:
            break
        model = inner
    return model


def edits(model: nn.Module, *, create: bool = False) -> Edits | None:
    """The record of `model` (the transformers model inside a wrapper), or None if quickloris has not touched it."""
    target = unwrap(model)
    record = target.__dict__.get(ATTR)
    if record is None and create:
        record = Edits()
        object.__setattr__(target, ATTR, record)
    return record


def state(model: nn.Module, step: str, default: Any = None) -> Any:
    """What `step` keeps on `model` (`default` if the step was not applied)."""
    record = edits(model)
    return default if record is None else record.state.get(step, default)


def set_state(model: nn.Module, step: str, value: Any) -> None:
    edits(model, create=True).state[step] = value


def _path(model: nn.Module, owner: Any) -> str:
    if owner is model:
        return "model"
    for name, module in model.named_modules():
        if module is owner:
            return f"model.{name}"
    return f"<{type(owner).__name__}>"


def _resolve(model: nn.Module, path: str) -> Any:
    owner = model
    for part in path.split(".")[1:]:
        owner = getattr(owner, part)
    return owner


def set_attribute(
    model: nn.Module,
    step: str,
    owner: Any,
    name: str,
    value: Any,
    what: str,
    *,
    path: str | None = None,
    undoable: bool = True,
) -> None:
    """Set ``owner.<name> = value`` on the object `owner` (the model or one of its modules) and record it.

    The previous *instance* value is kept for `undo` (a class attribute such as ``forward`` is never touched: the
    instance attribute shadows it, and undo deletes the instance attribute again). `path`: `owner`'s path if
    known (saves a search of the module tree).
    """
    target = unwrap(model)
    old = owner.__dict__.get(name, _MISSING)
    object.__setattr__(owner, name, value)
    where = path or _path(target, owner)
    edits(target, create=True).log.append(
        Edit(step, f"{where}.{name}", what, restore=(where, name, old) if undoable else None)
    )


def record(
    model: nn.Module, step: str, target: str, what: str, undo_fn: Callable[[nn.Module], None] | None = None
) -> None:
    """Record a change made through an HF / PyTorch API (`undo_fn(model)` reverts it; None: permanent)."""
    edits(model, create=True).log.append(Edit(step, target, what, undo_fn=undo_fn))


def applied(model: nn.Module, step: str) -> bool:
    record_ = edits(model)
    return record_ is not None and (step in record_.state or any(e.step == step for e in record_.log))


def undo(model: nn.Module, step: str) -> None:
    """Revert `step`'s edits, newest first, and forget its state. Raises if one of them is permanent."""
    target = unwrap(model)
    record_ = edits(target)
    if record_ is None:
        return
    mine = [e for e in record_.log if e.step == step]
    permanent = [e.target for e in mine if not e.undoable]
    if permanent:
        raise ValueError(f"cannot undo step {step!r}: {', '.join(permanent)} cannot be reverted")
    for e in reversed(mine):
        if e.undo_fn is not None:
            e.undo_fn(target)
        else:
            where, name, old = e.restore
            owner = _resolve(target, where)
            if old is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                object.__setattr__(owner, name, old)
    record_.log = [e for e in record_.log if e.step != step]
    record_.state.pop(step, None)


__all__ = [
    "ATTR",
    "Edit",
    "Edits",
    "unwrap",
    "edits",
    "state",
    "set_state",
    "set_attribute",
    "record",
    "applied",
    "undo",
]
