"""Clear errors for unsupported models and bad inputs, and a user's model left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD_ID, build_model, hf_greedy, make_batch
from transformers import GPT2Config, GPT2LMHeadModel, StoppingCriteria, StoppingCriteriaList

import sparse2dense
from sparse2dense import StdConfig, UnsupportedModelError


def custom(model, ids, **kwargs):
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("max_new_tokens", 4)
    return model.generate(ids, custom_generate=sparse2dense.custom_generate, **kwargs)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=128)).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def short_llama():
    """A Llama with a 256-token context."""
    return build_model("llama", max_position_embeddings=256)


# ------------------------------------------------------------------------------------ unsupported models
def test_unsupported_model_names_supported_families(gpt2):
    ids = torch.randint(0, 64, (1, 10))
    with pytest.raises(UnsupportedModelError) as info:
        sparse2dense.generate(gpt2, ids, max_new_tokens=3)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert family in message
    assert isinstance(info.value, ValueError)


def test_unsupported_model_via_model_generate(gpt2):
    ids = torch.randint(0, 64, (1, 10))
    with pytest.raises(UnsupportedModelError, match="supported: .*llama"):
        custom(gpt2, ids)


def test_unsupported_model_leaves_model_usable(gpt2):
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    before = gpt2.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with pytest.raises(UnsupportedModelError):
        sparse2dense.generate(gpt2, ids, max_new_tokens=3)
    assert torch.equal(gpt2.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), before)


def test_supported_models_lists_the_families():
    names = " ".join(sparse2dense.supported_models())
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert family in names


def test_object_without_config_is_unsupported():
    with pytest.raises(UnsupportedModelError):
        sparse2dense.generate(torch.nn.Linear(2, 2), torch.ones(1, 3, dtype=torch.long), max_new_tokens=1)


# ------------------------------------------------------------------------------------ context length
def test_prompt_plus_new_tokens_longer_than_context(short_llama):
    ids = torch.randint(3, 128, (1, 200))
    with pytest.raises(ValueError, match="context") as info:
        sparse2dense.generate(short_llama, ids, max_new_tokens=100)
    assert "256" in str(info.value) and "200" in str(info.value)
    with pytest.raises(ValueError, match="context"):
        custom(short_llama, ids, max_new_tokens=100)


def test_context_limit_counts_real_tokens_not_padding(short_llama):
    gen = torch.Generator().manual_seed(0)
    ids, mask = make_batch(gen, [200, 50])
    # exactly fills the context: allowed
    out = sparse2dense.generate(short_llama, ids, mask, max_new_tokens=56, budget=16, gamma=3, pad_token_id=PAD_ID)
    assert out.sequences.shape == (2, 256)
    with pytest.raises(ValueError, match="context"):
        sparse2dense.generate(short_llama, ids, mask, max_new_tokens=57)
    # a padded batch whose longest row fits, although prompt width + new tokens would not
    ids2 = torch.cat([torch.full((1, 100), PAD_ID), ids[:1, :150]], dim=1)
    mask2 = torch.cat([torch.zeros(1, 100, dtype=torch.long), torch.ones(1, 150, dtype=torch.long)], dim=1)
    out = sparse2dense.generate(short_llama, ids2, mask2, max_new_tokens=100, budget=16, gamma=3)
    assert out.sequences.shape == (1, 350)


# ------------------------------------------------------------------------------------ bad inputs
def right_padded():
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    ids[1, -7:] = PAD_ID
    return ids, mask


def test_right_padded_batch(llama):
    ids, mask = right_padded()
    with pytest.raises(ValueError, match="left"):
        sparse2dense.generate(llama, ids, mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="left"):
        custom(llama, ids, attention_mask=mask, pad_token_id=PAD_ID)


def test_padding_in_the_middle_is_rejected(llama):
    ids = torch.randint(3, 128, (1, 20))
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="left"):
        sparse2dense.generate(llama, ids, mask, max_new_tokens=3)


def test_all_padding_row(llama):
    ids = torch.randint(3, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match="non-padding"):
        sparse2dense.generate(llama, ids, mask, max_new_tokens=3)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_max_new_tokens_must_be_positive(llama, bad):
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="max_new_tokens"):
        sparse2dense.generate(llama, ids, max_new_tokens=bad)


def test_max_new_tokens_zero_via_model_generate(llama):
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="max_new_tokens"):
        custom(llama, ids, max_new_tokens=0)


def test_bad_context_mask_shape(llama):
    ids = torch.randint(3, 128, (2, 30))
    for shape in [(2, 29), (1, 30), (30,), (2, 30, 1)]:
        with pytest.raises(ValueError, match="context_mask"):
            sparse2dense.generate(llama, ids, max_new_tokens=3, context_mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="context_mask"):
        custom(llama, ids, context_mask=torch.ones(2, 29, dtype=torch.bool))


def test_bad_attention_mask_shape(llama):
    ids = torch.randint(3, 128, (2, 30))
    with pytest.raises(ValueError, match="attention_mask"):
        sparse2dense.generate(llama, ids, torch.ones(2, 31, dtype=torch.long), max_new_tokens=3)


@pytest.mark.parametrize("ids", [torch.ones(1, 5), torch.ones(1, 0, dtype=torch.long), torch.ones(0, 5, dtype=torch.long), [1, 2, 3]])
def test_bad_input_ids(llama, ids):
    with pytest.raises(ValueError, match="input_ids"):
        sparse2dense.generate(llama, ids, max_new_tokens=3)


def test_one_dimensional_input_ids_are_one_row(llama):
    ids = torch.randint(3, 128, (50,), generator=torch.Generator().manual_seed(3))
    out = sparse2dense.generate(llama, ids, max_new_tokens=6, budget=16, gamma=3)
    ref = llama.generate(ids.unsqueeze(0), attention_mask=torch.ones(1, 50, dtype=torch.long), max_new_tokens=6,
                         do_sample=False)
    assert torch.equal(out.sequences, ref)


def test_bad_config_values_via_kwargs(llama):
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="budget"):
        sparse2dense.generate(llama, ids, max_new_tokens=3, budget=0)
    with pytest.raises(ValueError, match="gamma"):
        sparse2dense.generate(llama, ids, max_new_tokens=3, gamma=-1)
    with pytest.raises(ValueError, match="gamma"):
        custom(llama, ids, gamma=100)


# ------------------------------------------------------------------------------------ unsupported decoding
def test_sampling_is_supported_through_custom_generate(llama):
    ids = torch.randint(3, 128, (2, 20))
    out = custom(llama, ids, do_sample=True)
    assert out.shape[0] == 2 and out.shape[1] > 20


def test_beam_search_is_rejected(llama):
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="beam"):
        custom(llama, ids, num_beams=2)


@pytest.mark.parametrize("flag", ["output_scores", "output_logits", "output_attentions", "output_hidden_states"])
def test_extra_outputs_are_rejected(llama, flag):
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="does not return"):
        custom(llama, ids, return_dict_in_generate=True, **{flag: True})


# ------------------------------------------------------------------------------------ the user's model afterwards
def test_model_is_unchanged_after_sparse2dense():
    model = build_model("qwen2")
    impl = model.config._attn_implementation
    ids, mask = make_batch(torch.Generator().manual_seed(0), [120, 90])
    before = hf_greedy(model, ids, mask, 12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen_config = model.generation_config.to_dict()

    sparse2dense.generate(model, ids, mask, max_new_tokens=10, budget=16, gamma=4, pad_token_id=PAD_ID)
    custom(model, ids, attention_mask=mask, pad_token_id=PAD_ID, max_new_tokens=10, budget=16, gamma=4)

    assert model.config._attn_implementation == impl
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.generation_config.to_dict() == gen_config
    assert not model.training
    assert torch.equal(hf_greedy(model, ids, mask, 12), before)
    # a plain forward pass still works with the model's own attention and cache
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits[mask.bool()]).all()


def test_eager_attention_is_restored():
    model = build_model("llama", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    out = sparse2dense.generate(model, ids, max_new_tokens=8, budget=16, gamma=3)
    assert torch.equal(out.sequences, ref)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref)


class Boom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom")


def test_model_is_restored_when_generation_raises(llama):
    """An exception in the middle of decoding must not leave sparse2dense's attention installed."""
    impl = llama.config._attn_implementation
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    ref = llama.generate(ids, max_new_tokens=6, do_sample=False)
    with pytest.raises(RuntimeError, match="boom"):
        sparse2dense.generate(llama, ids, max_new_tokens=6, budget=16, gamma=3,
                              stopping_criteria=StoppingCriteriaList([Boom()]))
    assert llama.config._attn_implementation == impl
    assert torch.equal(llama.generate(ids, max_new_tokens=6, do_sample=False), ref)


def test_independent_calls_do_not_share_state(llama):
    """Two different calls in a row, then the first again: same answer as the first time."""
    gen = torch.Generator().manual_seed(4)
    a_ids, a_mask = make_batch(gen, [300])
    b_ids, b_mask = make_batch(gen, [150, 90])
    config = StdConfig(budget=16, gamma=5, sink_tokens=2, keep_last=8)
    first = sparse2dense.generate(llama, a_ids, a_mask, max_new_tokens=20, config=config).sequences
    sparse2dense.generate(llama, b_ids, b_mask, max_new_tokens=8, config=config, pad_token_id=PAD_ID)
    again = sparse2dense.generate(llama, a_ids, a_mask, max_new_tokens=20, config=config).sequences
    assert torch.equal(first, again)
