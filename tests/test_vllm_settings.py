"""The vLLM drafter's settings and version check: these run without vLLM installed."""

from __future__ import annotations

import pytest

from sparse2dense.vllm import SUPPORTED, UnsupportedVllmError, check_version
from sparse2dense.vllm.settings import DraftSettings


def test_defaults_and_environment():
    s = DraftSettings.from_env({"SPARSE2DENSE_VLLM_BUDGET": "512", "SPARSE2DENSE_VLLM_MIN_PROMPT": "1000"})
    assert (s.budget, s.min_prompt, s.keep_last) == (512, 1000, DraftSettings().keep_last)


@pytest.mark.parametrize("env, message", [
    ({"SPARSE2DENSE_VLLM_BUDGET": "many"}, "must be an integer"),
    ({"SPARSE2DENSE_VLLM_BUDGET": "0"}, "at least 1"),
    ({"SPARSE2DENSE_VLLM_BUDGET": "32"}, "must hold the sink and kept tokens"),
    ({"SPARSE2DENSE_VLLM_BUDGTE": "512"}, "unknown setting SPARSE2DENSE_VLLM_BUDGTE"),
    ({"SPARSE2DENSE_VLLM_MAX_GENERATED": "-1"}, "non-negative"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        DraftSettings.from_env(env)


def test_version_check_names_what_to_install(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.31.2"))
    with pytest.raises(UnsupportedVllmError, match=rf"supports vLLM {SUPPORTED}\.x; this environment has 0\.31\.2"):
        check_version()
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=f"{SUPPORTED}.0"))
    assert check_version() == f"{SUPPORTED}.0"


def test_gate_measures_then_drafts_only_where_it_pays():
    from sparse2dense.vllm.gate import SpeculationGate

    gate = SpeculationGate(gamma=6, probe_every=1000)
    assert gate.should_draft(1)  # nothing measured: measure drafting first
    gate.record_draft(1, 0.040)
    gate.record_pass(1, drafted=True, seconds=0.070)
    assert not gate.should_draft(1)  # then measure a dense pass
    gate.record_pass(1, drafted=False, seconds=0.060)
    for _ in range(10):
        gate.record_acceptance(58, 60)
    assert gate.should_draft(1)  # ~6 tokens per 0.31 s beats 1 per 0.06 s
    # Batch 8: a draft step costs as much as a dense pass, so drafting cannot pay.
    gate.record_draft(8, 0.200)
    gate.record_pass(8, drafted=True, seconds=0.400)
    gate.record_pass(8, drafted=False, seconds=0.200)
    assert not gate.should_draft(8)
    gate.record_acceptance(0, 60)
    gate.record_acceptance(0, 60)
    gate.record_acceptance(0, 60)
    assert not gate.should_draft(1)  # acceptance collapsed: batch 1 stops drafting too


def test_gate_reprobes_the_option_not_taken():
    from sparse2dense.vllm.gate import SpeculationGate

    gate = SpeculationGate(gamma=4, probe_every=4)
    gate.record_draft(2, 0.1)
    gate.record_pass(2, True, 0.5)
    gate.record_pass(2, False, 0.05)
    choices = [gate.should_draft(2) for _ in range(8)]
    assert choices.count(True) == 2 and not choices[0]
