"""Decoder-only text LLMs (Llama, Mistral, Qwen2, Qwen3, ...)."""

from __future__ import annotations

import torch

from .base import Adapter, text_candidates

#: model_type values whose attention goes through the standard transformers attention interface
#: and that the parity tests cover.
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class TextAdapter(Adapter):
    """Candidates are every prompt token except the first ``sink_tokens`` and the last ``keep_last``."""

    def candidate_mask(self, input_ids: torch.Tensor, valid: torch.Tensor, config) -> torch.Tensor:
        return text_candidates(valid, config)
