"""The command line: help, the demo, generate, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "sparse2dense.cli"]


def run(*args, timeout=600):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("sparse2dense: error:")
             or "error:" in line]
    assert lines, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_help_explains_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for word in ("demo", "generate", "lossless".lower()):
        assert word in proc.stdout.lower()
    proc = run("generate", "--help")
    assert proc.returncode == 0 and "--budget" in proc.stdout and "--compare" in proc.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--budget", "0"], "--budget"),
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--gamma", "-1"], "--gamma"),
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--max-new-tokens", "x"], "--max-new-tokens"),
        (["demo", "--batch-sizes", "0"], "batch"),
    ],
)
def test_bad_parameters(args, fragment):
    proc = run(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and fragment in proc.stderr


def test_missing_context_file(tmp_path):
    proc = run("generate", "--model", "smollm2-135m", "--prompt", "hi", "--context-file", str(tmp_path / "nope.txt"))
    assert_one_line_error(proc, "context file not found")


def test_missing_model_folder(tmp_path):
    proc = run("generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi")
    assert_one_line_error(proc, "no such model")


@pytest.mark.slow
def test_unsupported_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=128))
    model.save_pretrained(tmp_path)
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    proc = run("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(proc, "does not support", "llama")


@pytest.mark.slow
def test_prompt_longer_than_context(tmp_path):
    from sparse2dense.demo import documentation_text

    doc = tmp_path / "long.txt"
    doc.write_text(documentation_text()[:120_000])
    proc = run("generate", "--model", "smollm2-135m", "--prompt", "Summarize.", "--context-file", str(doc))
    assert_one_line_error(proc, "exceeds the model's context")


@pytest.mark.slow
def test_generate_compare_json(tmp_path):
    from sparse2dense.demo import documentation_text

    doc = tmp_path / "doc.txt"
    doc.write_text(documentation_text()[:4000])
    proc = run("generate", "--model", "smollm2-135m", "--prompt", "What is this text about?", "--context-file",
               str(doc), "--max-new-tokens", "16", "--budget", "128", "--gamma", "4", "--compare", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["identical"] is True
    assert result["stats"]["new_tokens"] >= 1 and result["answer"]


@pytest.mark.slow
def test_demo_json_small():
    proc = run("demo", "--batch-sizes", "1,2", "--context-tokens", "400", "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [s["batch"] for s in result["scenarios"]] == [1, 2]
    for scenario in result["scenarios"]:
        assert scenario["identical"] is True
        names = [m["name"] for m in scenario["methods"]]
        assert any("static" in n for n in names) and any("StD" in n for n in names)


@pytest.mark.slow
def test_generate_stream_and_sampling():
    proc = run("generate", "--model", "smollm2-135m", "--prompt", "Write one sentence about the sea.", "--stream",
               "--do-sample", "--temperature", "0.7", "--seed", "1", "--max-new-tokens", "24", "--gamma", "4")
    assert proc.returncode == 0, proc.stderr
    assert "tokens per round" in proc.stdout and len(proc.stdout.splitlines()[0]) > 10


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--temperature", "0.5"], "need --do-sample"),
        (["--do-sample", "--compare"], "greedy"),
        (["--stream", "--json"], "--stream"),
        (["--do-sample", "--top-p", "1.5"], "--top-p"),
    ],
)
def test_bad_sampling_and_stream_options(args, fragment):
    proc = run("generate", "--model", "smollm2-135m", "--prompt", "hi", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and fragment in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--gamma", "0"], "--gamma"),
        (["--batch", "0"], "--batch"),
        (["--sweep", "colour"], "colour"),
        (["--methods", "dense,magic"], "magic"),
        (["--sweep", "batch", "--batchs", "1,x"], "integers"),
    ],
)
def test_bench_rejects_bad_settings(args, fragment):
    proc = run("bench", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and fragment in proc.stderr, proc.stderr


@pytest.mark.slow
def test_bench_point_runs_every_method(tmp_path):
    """One small sweep with every method: lossless methods identical, sparse-only lossy, files written."""
    from sparse2dense.bench import suite

    out = tmp_path / "bench"
    proc = run("bench", "--context", "500", "--budget", "64", "--gamma", "4", "--max-new-tokens", "8",
               "--repeats", "1", "--sweep", "gamma", "--gammas", "2,4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| method |" in proc.stdout and "prompt-lookup" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert len(data["points"]) == 2
    assert data["settings"]["gammas"] and data["software"]["transformers"] and data["software"]["torch"]
    for point in data["points"]:
        rows = {r["method"]: r for r in point["rows"]}
        assert set(rows) == set(suite.METHODS)
        for name, r in rows.items():
            if name != "sparse-only":
                assert r["identical"] is True, name
        assert rows["sparse-only"]["differing_tokens"] is not None
        assert rows["std"]["limit"] is not None and rows["std"]["limit"] > 0
        fastest = min(rows[m]["decode_ms_per_step"] for m in suite.DENSE_BASELINES)
        assert abs(rows["std"]["speedup"] - fastest / rows["std"]["decode_ms_per_step"]) < 1e-9
    assert (out / "results.md").is_file()
    assert (out / "speedup_vs_gamma.png").stat().st_size > 1000
