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
