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

__all__ = ["Adapter", "TextAdapter", "UnsupportedModelError", "get_adapter", "supported_models"]


def supported_models() -> list[str]:
    """Model classes (by family) that sparse2dense can accelerate."""
    return sorted(f"{t} (text LLM)" for t in TEXT_MODEL_TYPES)


def get_adapter(model) -> Adapter:
    """The adapter for ``model``, or ``UnsupportedModelError`` (a ``ValueError``) with the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in TEXT_MODEL_TYPES:
        return TextAdapter(model)
    raise UnsupportedModelError(
        f"sparse2dense does not support {type(model).__name__} (model_type={model_type!r}); "
        f"supported: {', '.join(supported_models())}."
    )
