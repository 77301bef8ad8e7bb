"""Per-model-family adapters.

An adapter answers the two questions the engine cannot answer generically:

* which prompt tokens are **candidates** the drafter may drop (visual tokens for Video-LLMs, the
  middle of the prompt for text LLMs), and
* which position ids a decoding step feeds the model (plain positions, or M-RoPE for the Qwen-VL
  family).

:func:`get_adapter` returns the adapter for a model or raises ``ValueError`` naming what is
supported.
"""

from __future__ import annotations

from .base import Adapter, UnsupportedModelError
from .text import TEXT_MODEL_TYPES, TextAdapter
from .vision import PlainVisionAdapter, QwenVLAdapter

#: vision-language model_type -> adapter class and the transformers class it targets
VISION_MODEL_TYPES = {
    "qwen2_vl": (QwenVLAdapter, "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": (QwenVLAdapter, "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": (QwenVLAdapter, "Qwen3VLForConditionalGeneration"),
    "llava_onevision": (PlainVisionAdapter, "LlavaOnevisionForConditionalGeneration"),
    "llava_next_video": (PlainVisionAdapter, "LlavaNextVideoForConditionalGeneration"),
    "idefics3": (PlainVisionAdapter, "Idefics3ForConditionalGeneration"),
    "smolvlm": (PlainVisionAdapter, "SmolVLMForConditionalGeneration"),
}

__all__ = ["Adapter", "TextAdapter", "UnsupportedModelError", "get_adapter", "supported_models"]


def supported_models() -> list[str]:
    """Model classes (by family) that sparse2dense can accelerate."""
    return sorted(f"{t} (text LLM)" for t in TEXT_MODEL_TYPES) + sorted(cls for _, cls in VISION_MODEL_TYPES.values())


def get_adapter(model) -> Adapter:
    """The adapter for ``model``, or ``UnsupportedModelError`` (a ``ValueError``) with the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in TEXT_MODEL_TYPES:
        return TextAdapter(model)
    if model_type in VISION_MODEL_TYPES:
        return VISION_MODEL_TYPES[model_type][0](model)
    raise UnsupportedModelError(
        f"sparse2dense does not support {type(model).__name__} (model_type={model_type!r}); "
        f"supported: {', '.join(supported_models())}."
    )
