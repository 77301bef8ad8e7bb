"""``sparse2dense serve``: an OpenAI-compatible server that batches concurrent requests through StD."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

from .common import UserError, _add_std_args, _positive, _positive_float, _quiet_transformers, _std_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat and completions, streaming, continuous batching)",
        description="Serve a model over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
                    "/v1/models, /health and /metrics (Prometheus). Concurrent requests join one running batch "
                    "(continuous batching) decoded with Sparse-to-Dense; every answer is what the model gives that "
                    "request alone. Binds to 127.0.0.1 unless --host says otherwise. With no --model it serves the "
                    "bundled SmolLM2-135M-Instruct.",
        epilog="Example: sparse2dense serve --port 8000 --max-batch 8\n"
               "         curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "              -d '{\"model\": \"smollm2-135m\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local folder, .gguf file, or smollm2-135m (default: the bundled SmolLM2-135M)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model (a folder or hub repo)")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_positive("--port"), default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-batch", type=_positive("--max-batch"), default=8,
                   help="requests decoded together; more wait in a queue (default: 8)")
    p.add_argument("--max-seq-len", type=_positive("--max-seq-len"), default=None,
                   help="prompt plus new tokens per request (default: the model's context, at most 8192)")
    p.add_argument("--max-queue", type=_positive("--max-queue"), default=64,
                   help="requests waiting for a batch slot before new ones get 429 (default: 64)")
    p.add_argument("--max-tokens", type=_positive("--max-tokens"), default=256,
                   help="new tokens when a request gives no max_tokens (default: 256)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--allowed-media-dir", help="read local image/video files only inside this folder (default: none)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs (default: refuse)")
    p.add_argument("--max-body-mb", type=_positive_float("--max-body-mb"), default=64.0,
                   help="largest request body, in MB (default: 64)")
    p.add_argument("--max-frames", type=_positive("--max-frames"), default=32,
                   help="frames sampled from a video at most (default: 32)")
    p.add_argument("--prefill-tokens-per-step", type=_positive("--prefill-tokens-per-step"), default=512,
                   help="prompt tokens a joining request prefills between two decoding rounds (default: 512)")
    p.add_argument("--shutdown-timeout", type=_positive_float("--shutdown-timeout"), default=10.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are cancelled")
    p.add_argument("--dense", action="store_true", help="plain dense decoding (same as --gamma 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model weights dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    _add_std_args(p, gamma_default="auto", draft_default=None, budget_default="auto")


def build(args):
    """``(app, engine)`` for these arguments (the tests call this without starting uvicorn)."""
    try:
        from ..serve import ServeConfig, build_app
    except ImportError as exc:
        raise UserError(f"serving needs the serve extra: pip install 'sparse2dense[serve]' ({exc})") from None
    from ..engine import Engine
    from ..models import is_vision_model, load_model

    cfg = ServeConfig(model_name=args.served_model_name or args.model, api_key=args.api_key,
                      allowed_media_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None,
                      allow_remote_media=args.allow_remote_media, max_queue=args.max_queue,
                      max_body_mb=args.max_body_mb, max_frames=args.max_frames, default_max_tokens=args.max_tokens,
                      shutdown_timeout_s=args.shutdown_timeout)
    vision = is_vision_model(args.model, args.gguf_file)
    model, tok = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
                            log=lambda *a: print(*a, file=sys.stderr), vision=vision)
    tokenizer = getattr(tok, "tokenizer", tok)
    engine = Engine(model, max_batch=args.max_batch, config=_std_config(args), max_seq_len=args.max_seq_len,
                    tokenizer=tokenizer, prefill_tokens_per_step=args.prefill_tokens_per_step)
    return build_app(engine, tokenizer, cfg, vision=vision, processor=tok), engine


def run(args) -> int:
    _quiet_transformers()
    app, engine = build(args)
    import uvicorn

    print(f"serving {args.served_model_name or args.model} on http://{args.host}:{args.port}/v1 "
          f"(max batch {engine.max_batch}, max_seq_len {engine.max_seq_len}, gamma {engine.cfg.gamma}, "
          f"budget {engine.cfg.budget})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=int(args.shutdown_timeout) + 15))
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown (exit status -15), and cancels
    # handlers still running when its timeout ends. Here the first signal stops accepting, lets the
    # running requests finish for --shutdown-timeout, cancels the rest (they answer normally, as
    # cancelled), then stops uvicorn; the exit status is 0. A second signal forces the exit.
    server.capture_signals = contextlib.nullcontext
    worker = app.state.server.worker

    def drain():
        worker.drain(args.shutdown_timeout)
        server.should_exit = True

    def stop(signum, frame):
        if worker.accepting:
            worker.accepting = False
            threading.Thread(target=drain, daemon=True).start()
        else:
            server.should_exit = server.force_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    server.run()
    return 0
