"""`VisionFamilySpec`: a vision-language model family (an image encoder + projector feeding a decoder-only LM).

The language model is what quickloris quantizes and adapts, exactly as a text family's decoder; the spec says where
it sits inside the multimodal base model and where the vision parts are:

* ``text_model``: the language model's attribute in the base model (``model.<base_model_prefix>``); `decoder`
  returns it and `layers_path` goes through it (``model.language_model.layers``), so every module that finds the
  decoder layers through a spec (prepare, checkpointing, FSDP2, compile) sees the language model's layers.
* ``vision_modules``: the vision tower and projector in the base model (frozen; LoRA with ``--train-vision``).
* ``text_family``: None - the spec's own `Attention` describes the language model; ``"auto"`` - the language model
  is any registered text family (Llava's Llama / Mistral / Qwen2 decoders): its spec, found from the text config's
  ``model_type``, says what sliding windows and softcaps it has.
* ``flex`` / ``packing``: whether quickloris' flex attention and padding-free packing apply. Mllama's
  cross-attention layers take a dense image mask through the same attention function (no flex), and a text token
  with no image before it attends uniformly to every image of its row, which packing would change.
* ``mrope``: multimodal 3-D RoPE (Qwen2-VL / Qwen2.5-VL): position ids ``[3, batch, seq]`` (temporal, height,
  width), or ``[4, batch, seq]`` with the plain text positions first (what packing passes).
* ``cross_attention``: images enter through cross-attention layers (Mllama), not as tokens of the sequence.

Config-reading methods read the text config (``config.get_text_config()``), which holds the decoder's settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from quickloris.models.families._spec import FamilySpec


def text_config(config: Any) -> Any:
    """The language model's config of a multimodal config (the config itself for a text model)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


@dataclasses.dataclass(frozen=True)
class VisionFamilySpec(FamilySpec):
    text_model: str = "language_model"
    vision_modules: tuple[str, ...] = ()
    text_family: Literal["auto"] | None = None
    flex: bool = True
    packing: bool = True
    mrope: bool = False
    cross_attention: bool = False

    def decoder(self, model: Any) -> Any:
        base = super().decoder(model)
        inner = getattr(base, self.text_model, None)
        if inner is None:
            raise TypeError(
                f"{type(model).__name__} has no language model at model.{model.base_model_prefix}.{self.text_model}"
            )
        return inner

    def layers_path(self, model: Any) -> str:
        return f"{model.base_model_prefix}.{self.text_model}.{self.layers}"

    def vision_parts(self, model: Any) -> dict[str, Any]:
        """{path from the root model: module} of the vision tower and projector."""
        base = super().decoder(model)
        return {
            f"{model.base_model_prefix}.{name}": base.get_submodule(name)
            for name in self.vision_modules
            if getattr(base, name, None) is not None
        }

    def text_spec(self, config: Any) -> FamilySpec:
        """The spec describing the language model's attention: this one, or its registered text family's."""
        if self.text_family is None:
            return self
        from quickloris.models.families import family_of

        spec = family_of(text_config(config))
        return spec if spec.registered else self

    def windows(self, config: Any) -> dict[str | None, int | None]:
        spec, cfg = self.text_spec(config), text_config(config)
        return FamilySpec.windows(spec, cfg)

    def attention_softcap(self, config: Any) -> float | None:
        return FamilySpec.attention_softcap(self.text_spec(config), text_config(config))

    def logit_softcap(self, config: Any) -> float | None:
        return FamilySpec.logit_softcap(self.text_spec(config), text_config(config))


__all__ = ["VisionFamilySpec", "text_config"]
