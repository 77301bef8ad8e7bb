"""Load test of ``sparse2dense serve`` on loopback: StD against ``--dense``, side by side in one run.

Run: ``python -m sparse2dense.bench.load [--concurrency 1,4,8,16] [--requests-per-client 2]
[--context 4000-6000] [--max-tokens 128] [--out bench-out/load]``.

For each server (StD with ``--gamma auto --budget auto``, then ``--dense``; or any ``--target``
URL, e.g. a ``vllm serve``), the same real long-context chat requests (Python's documentation plus
a question) are sent by 1, 4, 8 and 16 concurrent clients, each streaming its answers one after the
other with the official ``openai`` client. Every answer is checked against its own reference,
transformers' greedy ``generate`` on that request alone, so a lost, duplicated or mixed-up answer
shows as a mismatch. Reported per server and concurrency: p50/p95 latency, p50/p95 time to first
token, output tokens per second end to end (completion tokens over the wall time of the level,
prefill included) and each request's decode rate after its first token (median).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

MODEL = "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], max_batch: int, max_seq_len: int) -> tuple[subprocess.Popen, str]:
    """``sparse2dense serve`` in a subprocess; returns it and its base URL once /health answers."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "sparse2dense.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-seq-len", str(max_seq_len), "--max-queue", "256", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start within 300 s")


def build_requests(tok, n: int, lo: int, hi: int) -> list[list[dict]]:
    """``n`` chat requests whose prompts are ``lo``-``hi`` tokens of documentation plus a question."""
    from ..workloads import QUESTIONS, documentation_text

    doc = tok(documentation_text(), add_special_tokens=False).input_ids
    out = []
    for i in range(n):
        size = lo + (hi - lo) * i // max(1, n - 1)
        start = (i * 15013) % (len(doc) - size)
        text = tok.decode(doc[start : start + size])
        out.append([{"role": "user", "content": f"{text}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}])
    return out


def references(requests: list[list[dict]], max_tokens: int, say, cache: Path | None = None) -> list[str]:
    """transformers' greedy answer to each request alone (kept in ``cache`` for the same requests)."""
    import hashlib

    import torch

    key = hashlib.sha256(json.dumps([requests, max_tokens]).encode()).hexdigest()
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            say("  references from " + str(cache))
            return saved["answers"]

    from ..models import load_demo_model

    model, tok = load_demo_model(log=lambda *a: None)
    out = []
    for i, messages in enumerate(requests):
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            seq = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
        out.append(tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        say(f"  reference {i + 1}/{len(requests)}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "answers": out}))
    return out


def _one(client, model: str, messages, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"text": "".join(pieces), "latency": end - t0, "ttft": (first or end) - t0,
            "tokens": usage.completion_tokens if usage else None, "decode": end - (first or end)}


def run_level(url: str, model: str, requests, refs, concurrency: int, per_client: int, max_tokens: int) -> dict:
    """``concurrency`` clients, each sending ``per_client`` requests in turn; returns the level's figures."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    results: dict[int, dict] = {}
    errors: list[str] = []

    def worker(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            try:
                results[i] = _one(client, model, requests[i], max_tokens)
            except Exception as exc:  # a failed request is a finding, not a crash of the bench
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = list(results.values())
    mismatches = [i for i, r in results.items() if r["text"] != refs[i]]
    tokens = sum(r["tokens"] or 0 for r in done)
    rates = sorted(max(0, (r["tokens"] or 0) - 1) / r["decode"] for r in done if r["decode"] > 0)

    def pct(key, q):
        xs = sorted(r[key] for r in done)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"concurrency": concurrency, "requests": concurrency * per_client, "answered": len(done),
            "errors": errors, "mismatches": mismatches, "wall_s": wall, "completion_tokens": tokens,
            "output_tok_s": tokens / wall, "decode_tok_s": rates[len(rates) // 2] if rates else float("nan"),
            "latency_p50": pct("latency", 0.5), "latency_p95": pct("latency", 0.95),
            "ttft_p50": pct("ttft", 0.5), "ttft_p95": pct("ttft", 0.95)}


def _markdown(rows: list[dict]) -> str:
    lines = ["| server | clients | answered | mismatches | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s | "
             "output tok/s | p50 decode tok/s per request | vs dense |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["concurrency"]: r["output_tok_s"] for r in rows if r["server"] == "dense"}
    for r in rows:
        ratio = r["output_tok_s"] / dense[r["concurrency"]] if r["concurrency"] in dense else float("nan")
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['answered']}/{r['requests']} | {len(r['mismatches'])} "
                     f"| {r['latency_p50']:.1f} | {r['latency_p95']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} "
                     f"| {r['output_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparse2dense.bench.load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--concurrency", default="1,4,8,16", help="client counts (default 1,4,8,16)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn (2)")
    p.add_argument("--context", default="4000-6000", help="prompt tokens, LO-HI (default 4000-6000)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer (default 128)")
    p.add_argument("--max-batch", type=int, default=16, help="the servers' --max-batch (default 16)")
    p.add_argument("--servers", default="std,dense", help="std, dense, or NAME=URL of a running server")
    p.add_argument("--out", default="bench-out/load", help="folder for results.json and results.md")
    args = p.parse_args(argv)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    levels = [int(c) for c in args.concurrency.split(",")]
    lo, _, hi = args.context.partition("-")
    from ..models import load_demo_model

    _, tok = load_demo_model(log=lambda *a: None)
    n = max(levels) * args.requests_per_client
    requests = build_requests(tok, n, int(lo), int(hi or lo))
    say(f"{n} requests of {lo}-{hi or lo} prompt tokens; references (transformers generate, alone):")
    refs = references(requests, args.max_tokens, say, Path(args.out) / "references.json")
    rows = []
    for spec in args.servers.split(","):
        name, _, url = spec.partition("=")
        proc = None
        if not url:
            extra = ["--dense"] if name == "dense" else ["--gamma", "auto", "--budget", "auto"]
            proc, url = start_server(extra, args.max_batch, int(hi or lo) + args.max_tokens + 256)
        try:
            for c in levels:
                say(f"{name}: {c} clients")
                row = run_level(url, MODEL, requests, refs, c, args.requests_per_client, args.max_tokens)
                rows.append({"server": name, **row})
                say(f"  {row['output_tok_s']:.1f} output tok/s, {len(row['mismatches'])} mismatches")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = _markdown(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print(table)
    ok = all(not r["mismatches"] and not r["errors"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
