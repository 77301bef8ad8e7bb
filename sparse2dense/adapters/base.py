"""The adapter interface shared by all model families."""

from __future__ import annotations

import torch


def text_candidates(valid: torch.Tensor, config) -> torch.Tensor:
    """The text-LLM rule: every non-padding prompt token except the first ``config.sink_tokens``
    and the last ``config.keep_last`` of its row. bool ``[B, P]``."""
    from_start = valid.long().cumsum(dim=1) - 1
    from_end = valid.long().flip(1).cumsum(dim=1).flip(1) - 1
    return valid & (from_start >= config.sink_tokens) & (from_end >= config.keep_last)


class UnsupportedModelError(ValueError):
    """The model (or its configuration) cannot be run by sparse2dense."""


class Adapter:
    """What the engine needs to know about one model family.

    Subclasses override :meth:`candidate_mask` and, for models with multimodal positions,
    :meth:`position_ids`. ``self.text_config`` is the config of the language model that owns the
    KV cache.
    """

    #: prompt chunks may be prefilled separately (False when vision inputs need one pass).
    chunked_prefill: bool = True

    def __init__(self, model):
        self.model = model
        self.text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.check_supported()

    # --- model geometry -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_q_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_q_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_q_heads

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    @property
    def sliding_window(self) -> int | None:
        """Window of the sliding-window layers, or None when every layer attends to everything."""
        window = getattr(self.text_config, "sliding_window", None)
        layer_types = getattr(self.text_config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if getattr(self.text_config, "use_sliding_window", True) is False:
            return None
        return window

    def check_supported(self) -> None:
        """Raise ``UnsupportedModelError`` for configurations the engine cannot run exactly."""
        cfg = self.text_config
        layer_types = getattr(cfg, "layer_types", None) or []
        odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if odd:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has {', '.join(odd)} layers; sparse2dense supports only full and "
                "sliding-window attention layers."
            )
        for attr in ("attn_logit_softcapping", "attention_chunk_size"):
            if getattr(cfg, attr, None):
                raise UnsupportedModelError(f"{type(self.model).__name__} uses {attr}, which sparse2dense does not support.")
        if self.num_q_heads % self.num_kv_heads:
            raise UnsupportedModelError("query heads must be a multiple of KV heads.")

    # --- per-family behaviour ------------------------------------------------------------
    def candidate_mask(self, input_ids: torch.Tensor, valid: torch.Tensor, config) -> torch.Tensor:
        """bool ``[B, P]``: prompt tokens the drafter may drop. ``valid`` marks non-padding tokens."""
        raise NotImplementedError

    def position_ids(self, positions: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Position ids to feed for text positions ``[B, T]`` (plain RoPE: unchanged).

        ``offsets``: the per-row values that :meth:`prefill_position_ids` returned (``[B, 1]``), or
        None; the engine keeps them with each row, so rows prefilled apart can share a batch.
        """
        return positions

    def prefill_kwargs(self, model_inputs: dict) -> dict:
        """Extra keyword arguments for the prefill forward pass (pixel values, grids, ...)."""
        return {}

    def prefill_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, model_inputs: dict,
                             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids for the whole prompt (last dim = prompt length) and the per-row offsets that
        decoding steps pass back to :meth:`position_ids` (``[B, 1]``, or None)."""
        return self.position_ids(positions), None

    def adopt_position_ids(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Take the prompt's position ids prepared by ``generate``: ``(position ids, offsets)``."""
        return position_ids, None

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """bool ``[B, P]`` marking visual tokens, or None for text-only model families."""
        return None
