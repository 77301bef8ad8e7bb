"""``sparse2dense serve``: a real uvicorn server on 127.0.0.1, driven by the official ``openai`` client.

The text model is the real SmolLM2-135M-Instruct with its real tokenizer and chat template; every
greedy answer is compared with transformers' own greedy ``generate`` on that request alone, also
when requests run concurrently (they share one continuously batched engine). Bad requests must get
4xx JSON errors in the OpenAI format while the server keeps answering others; images and videos go
through a tiny real Qwen2-VL built from a config (``test_cli_video.py``'s model).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """An app served by uvicorn in a thread of this process."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_args(**overrides):
    from sparse2dense.cli import build_parser

    argv = ["serve", "--model", overrides.pop("model", MODEL), "--max-batch", str(overrides.pop("max_batch", 4))]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def smol():
    from sparse2dense.cli import serve_cmd

    app, engine = serve_cmd.build(serve_args(max_seq_len=2048, budget=64, gamma=4, max_queue=8))
    running = Running(app)
    running.engine, running.app = engine, app
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference():
    """transformers' own greedy answer to one chat or completion prompt, alone."""
    from sparse2dense.models import load_demo_model

    model, tok = load_demo_model(log=lambda *a: None)

    def chat(messages, max_tokens):
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        return _greedy(model, tok, enc["input_ids"], max_tokens)

    def completion(prompt, max_tokens):
        return _greedy(model, tok, torch.tensor([tok(prompt).input_ids]), max_tokens)

    return chat, completion


def _greedy(model, tok, ids, max_tokens):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), len(new)


def questions():
    from sparse2dense.workloads import QUESTIONS, documentation_text

    doc = documentation_text()
    return [[{"role": "user", "content": doc[i * 5000 : i * 5000 + 600 + 300 * i] + "\n\n" + q}]
            for i, q in enumerate(QUESTIONS[:6])]


def test_concurrent_greedy_chats_equal_generate_alone(smol, reference):
    chat, _ = reference
    client = smol.client()
    messages = questions()
    lengths = [40, 24, 56, 32, 48, 20]

    def ask(i):
        return client.chat.completions.create(model=MODEL, messages=messages[i], max_tokens=lengths[i], temperature=0)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    for i, answer in enumerate(answers):
        text, n = chat(messages[i], lengths[i])
        assert answer.choices[0].message.content == text, i
        assert answer.usage.completion_tokens == n and answer.choices[0].finish_reason in ("stop", "length")
        assert answer.model_extra["sparse2dense"]["rounds"] > 0
    assert max(row[0] for row in smol.engine.stats.round_log) > 1, "the requests must have shared a batch"


def test_streamed_answer_equals_the_unstreamed_one(smol):
    client = smol.client()
    msgs = questions()[1]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_endpoint_and_stop_strings(smol, reference):
    _, completion = reference
    client = smol.client()
    prompt = "The Python with statement"
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
    text, _ = completion(prompt, 30)
    assert got.choices[0].text == text
    stop = text.split()[3]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_reproduces(smol):
    client = smol.client()
    msgs = questions()[2]
    kw = dict(model=MODEL, messages=msgs, max_tokens=24, temperature=0.8, top_p=0.9, seed=11)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(**{**kw, "seed": 12}).choices[0].message.content
    assert a == b and a != c
    penalised = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                               frequency_penalty=1.5, presence_penalty=0.5)
    assert penalised.choices[0].message.content


@pytest.mark.parametrize("body,status,match", [
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "does not exist"),
    ({"messages": []}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, 400, "tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a.mp4"}}]}]}, 400,
     "text only"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(smol, body, status, match):
    body = {"model": MODEL, **body}
    r = httpx.post(smol.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert match in error["message"] and error["type"]
    ok = smol.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_malformed_json_and_unknown_routes(smol):
    r = httpx.post(smol.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(smol.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        smol.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])


def test_health_models_and_metrics(smol):
    assert httpx.get(smol.url + "/health").json() == {"status": "ok"}
    models = smol.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(smol.url + "/metrics").text
    for name in ("sparse2dense_requests_total", "sparse2dense_generation_tokens_total", "sparse2dense_batch_occupancy",
                 "sparse2dense_queue_length", "sparse2dense_acceptance_rate", "sparse2dense_speculation_on"):
        assert name in text


def test_a_client_that_disconnects_cancels_its_request(smol):
    with httpx.stream("POST", smol.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": questions()[3], "max_tokens": 500, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                break
    deadline = time.time() + 30
    while time.time() < deadline and smol.engine.pending():
        time.sleep(0.1)
    assert not smol.engine.pending()
    assert 'finish_reason="cancelled"' in httpx.get(smol.url + "/metrics").text


def test_queue_full_gets_429(reference):
    from sparse2dense.cli import serve_cmd

    app, engine = serve_cmd.build(serve_args(max_batch=1, max_queue=1, max_seq_len=1024, gamma=0))
    running = Running(app)
    try:
        client = running.client()

        def ask(_):
            try:
                client.chat.completions.create(model=MODEL, messages=questions()[0], max_tokens=30)
                return 200
            except openai.RateLimitError as exc:
                assert exc.response.headers["retry-after"] == "1"
                return 429

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(6)))
        assert 429 in codes and 200 in codes
    finally:
        running.stop()


def test_api_key_and_media_safety(tmp_path):
    from sparse2dense.cli import serve_cmd

    (tmp_path / "inside").mkdir()
    app, _ = serve_cmd.build(serve_args(api_key="sekrit", allowed_media_dir=tmp_path / "inside", max_seq_len=512))
    running = Running(app)
    try:
        assert httpx.get(running.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        assert running.client(api_key="sekrit").models.list().data[0].id == MODEL
        assert httpx.get(running.url + "/metrics").status_code == 401
    finally:
        running.stop()


# ----------------------------------------------------------------------------------- Video-LLM
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from test_cli_video import encode_clip, make_tiny_qwen2vl

    folder = make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))
    media = tmp_path_factory.mktemp("media")
    encode_clip(media / "clip.mp4")
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    from sparse2dense.cli import serve_cmd

    app, engine = serve_cmd.build(serve_args(model=str(folder), allowed_media_dir=media, budget=16, gamma=3,
                                             max_frames=6, max_seq_len=1024, served_model_name="tiny-vl"))
    running = Running(app)
    running.engine, running.folder, running.media = engine, folder, media
    yield running
    running.stop()


def _video_reference(folder, frames, prompt, max_tokens):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from sparse2dense.video_inputs import build_video_inputs

    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    inputs = build_video_inputs(model, tok, frames, prompt)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_video_and_image_parts(tiny_vlm):
    from sparse2dense.video import read_video

    client = tiny_vlm.client()
    clip = tiny_vlm.media / "clip.mp4"
    for url in (str(clip), "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()):
        answer = client.chat.completions.create(model="tiny-vl", max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What moves?"}]}])
        frames = read_video(clip, num_frames=6, max_frames=6).frames
        assert answer.choices[0].message.content == _video_reference(tiny_vlm.folder, frames, "What moves?", 12)
    from PIL import Image
    import io

    png = io.BytesIO()
    Image.fromarray(frames[0]).save(png, format="PNG")
    image = client.chat.completions.create(model="tiny-vl", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}},
            {"type": "text", "text": "Describe."}]}])
    assert image.choices[0].message.content == _video_reference(tiny_vlm.folder, frames[:1], "Describe.", 8)


@pytest.mark.parametrize("url,match", [
    ("broken.mp4", "could not be read"),
    ("/etc/passwd", "outside the allowed media folder"),
    ("../../etc/hosts", "outside the allowed media folder"),
    ("https://example.com/a.mp4", "remote media URLs are refused"),
    ("data:video/mp4;base64,@@@", "not valid base64"),
])
def test_bad_media_gets_400(tiny_vlm, url, match):
    body = {"model": "tiny-vl", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi"}]}]}
    r = httpx.post(tiny_vlm.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
    ok = tiny_vlm.client().chat.completions.create(model="tiny-vl", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3)
    assert ok.usage.completion_tokens >= 1


# ----------------------------------------------------------------------------------- the command
def test_serve_command_exits_0_on_sigterm_with_a_request_running():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sparse2dense.cli", "serve", "--port", str(port), "--max-seq-len",
                             "1024", "--shutdown-timeout", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        results = []
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

        def ask():
            try:
                results.append(client.chat.completions.create(model=MODEL, max_tokens=400,
                                                              messages=[{"role": "user", "content": "Count to 300."}]))
            except openai.APIError as exc:
                results.append(exc)

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        asker.join(timeout=30)
        assert results, "the running request got an answer or an error, not a hang"
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "Traceback" not in out, out


def test_serve_help_and_bad_options():
    out = subprocess.run([sys.executable, "-m", "sparse2dense.cli", "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--allowed-media-dir" in out.stdout and "127.0.0.1" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "sparse2dense.cli", "serve", "--allowed-media-dir", "/nonexistent"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("sparse2dense: error:")
    assert "Traceback" not in bad.stderr
    assert json.loads(json.dumps({"ok": True}))
