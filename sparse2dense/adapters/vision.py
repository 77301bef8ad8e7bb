"""Vision-language models: the visual tokens of images and videos are the drafter's candidates.

Every text token (system prompt, question, chat markup) stays in the draft cache, as in the
Sparse-to-Dense paper; the drafter keeps the ``budget`` minus that many visual tokens that the
text attends to most. The whole prompt is prefilled in one pass, because vision features are merged
into the embeddings by the model's own forward.
"""

from __future__ import annotations

import torch

from .base import Adapter, text_candidates

# model inputs that generate() manages and sparse2dense replaces
_MANAGED = {"input_ids", "attention_mask", "position_ids", "past_key_values", "use_cache", "logits_to_keep",
            "cache_position"}


class VisionAdapter(Adapter):
    """Shared behaviour: visual-token candidates, single-pass prefill with vision inputs."""

    chunked_prefill = False
    #: config attributes holding the placeholder token ids of images and videos
    token_attrs: tuple[str, ...] = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")

    def visual_token_ids(self) -> list[int]:
        ids = set()
        for attr in self.token_attrs:
            for cfg in (self.model.config, self.text_config):
                value = getattr(cfg, attr, None)
                if isinstance(value, int):
                    ids.add(value)
        return sorted(ids)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.visual_token_ids(), device=input_ids.device, dtype=input_ids.dtype)
        return torch.isin(input_ids, ids)

    def candidate_mask(self, input_ids: torch.Tensor, valid: torch.Tensor, config) -> torch.Tensor:
        visual = self.visual_mask(input_ids) & valid
        if bool(visual.any()):
            return visual
        return text_candidates(valid, config)  # a text-only prompt to a VLM: the text-LLM rule

    def prefill_kwargs(self, model_inputs: dict) -> dict:
        return {k: v for k, v in model_inputs.items() if k not in _MANAGED and v is not None}


class PlainVisionAdapter(VisionAdapter):
    """LLaVA-OneVision, LLaVA-NeXT-Video, Idefics3/SmolVLM: 1-D positions like a text LLM."""


class QwenVLAdapter(VisionAdapter):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: multimodal RoPE.

    The prompt's position ids come from the model's own ``_prepare_position_ids_for_generation``
    (what ``generate`` uses): ``[4, B, P]`` with text positions in row 0 and the 3-D (time, height,
    width) positions in rows 1-3. While decoding, a token at text position ``t`` of row ``b`` has
    3-D position ``t + rope_deltas[b]`` on all three axes; ``rope_deltas`` ``[B, 1]`` are the
    per-row offsets the engine keeps with each row.
    """

    def prefill_position_ids(self, input_ids, attention_mask, model_inputs, positions):
        kwargs = {k: v for k, v in model_inputs.items() if v is not None}
        kwargs["attention_mask"] = attention_mask
        pos = self.model._prepare_position_ids_for_generation(input_ids, kwargs)
        deltas = self.model.model.rope_deltas.to(positions.device)
        if pos.ndim == 2:  # text-only path of some versions
            pos = self.position_ids(positions, deltas)
        return pos, deltas

    def adopt_position_ids(self, position_ids: torch.Tensor):
        # generate() stored the matching rope_deltas on the model when it built these ids
        deltas = getattr(self.model.model, "rope_deltas", None)
        deltas = deltas.to(position_ids.device) if deltas is not None else None
        if position_ids.ndim == 2:
            return self.position_ids(position_ids, deltas), deltas
        return position_ids, deltas

    def position_ids(self, positions: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        deltas = offsets if offsets is not None else torch.zeros_like(positions[:, :1])
        mrope = (positions + deltas).unsqueeze(0).expand(3, -1, -1)
        return torch.cat([positions.unsqueeze(0), mrope], dim=0)
