"""Shared fixtures: tiny random-weight models of every supported family, and batch helpers.

Everything here runs offline on a CPU: models are built from configs in code (fp32, random weights,
seeded), never downloaded.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# One intra-op thread: these models are tiny, so a second thread buys nothing, and when anything
# else runs on the (2-core) machine OpenMP spin-waiting makes 2 threads 10-50x slower.
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB = 128
PAD_ID = 0
#: token ids used for random prompts (0..2 are left for pad / bos / eos)
FIRST_TOKEN = 3

_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

#: name -> (model class, config class, config overrides)
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    # head_dim 32 != hidden_size / heads (16): exercises the explicit head_dim path
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 32}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": None}),
    "mistral_sw48": (MistralForCausalLM, MistralConfig, {"sliding_window": 48}),
    "mistral_sw4096": (MistralForCausalLM, MistralConfig, {}),  # transformers' default window
    # Qwen2 with one full and one sliding-window layer
    "qwen2_sw40": (
        Qwen2ForCausalLM,
        Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 40, "max_window_layers": 1},
    ),
}

#: architectures whose layers all attend to the whole context
FULL_ATTENTION_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
#: architectures with sliding-window layers
SLIDING_ARCHS = ("mistral_sw48", "mistral_sw4096", "qwen2_sw40")


def build_model(arch: str, seed: int = 0, **overrides):
    """A tiny fp32 model with random weights; no EOS in its generation config (tests pass one)."""
    model_cls, config_cls, defaults = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**_BASE, **defaults, **overrides})
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@functools.lru_cache(maxsize=None)
def _cached_model(arch: str):
    return build_model(arch)


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(arch)``: the shared (cached) tiny model of that architecture. Do not mutate it."""
    return _cached_model


@pytest.fixture(scope="session")
def llama():
    return _cached_model("llama")


def make_batch(gen: torch.Generator, lens, vocab: int = VOCAB, pad_id: int = PAD_ID):
    """Random left-padded batch: ``(input_ids [B, max(lens)], attention_mask [B, max(lens)])``.

    Row ``b`` has ``lens[b]`` real tokens at the end and ``pad_id`` with mask 0 before them.
    """
    width = max(lens)
    ids = torch.full((len(lens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lens), width), dtype=torch.long)
    for row, length in enumerate(lens):
        ids[row, width - length :] = torch.randint(FIRST_TOKEN, vocab, (length,), generator=gen)
        mask[row, width - length :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, **kwargs):
    """Reference: plain greedy ``model.generate``."""
    kwargs.setdefault("pad_token_id", PAD_ID)
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def bare_engine(model, config, ids, mask, max_new):
    """A one-batch engine without EOS, processors or criteria, its batch submitted (not yet prefilled):
    ``(engine, group)``. Tests drive its phases by hand: ``engine.prefill()`` (which also selects),
    ``engine.decode()``, ``engine.output(group)``."""
    from sparse2dense.generation import batch_engine

    return batch_engine(model, ids, mask, max_new, config, eos_token_id=[], pad_token_id=PAD_ID)
