"""The OpenAI-compatible HTTP API (FastAPI), following vLLM's server.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /health``, ``GET /metrics``. Responses carry ``usage`` and a ``sparse2dense`` field with the
request's Sparse-to-Dense statistics; ``stream: true`` answers with server-sent events in the OpenAI
chunk format, ending with ``data: [DONE]``. Errors are 4xx JSON in the OpenAI format.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..requests import AdmissionError
from . import protocol
from .config import ServeConfig
from .errors import APIError
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .text import TextStream
from .worker import EngineWorker, Stream

_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def _std_stats(handle) -> dict:
    st = handle.stats
    return {"acceptance_rate": round(st.acceptance_rate, 4), "tokens_per_round": round(st.mean_accepted_per_round, 3),
            "rounds": st.rounds, "drafted": st.drafted, "accepted": st.accepted, "speculation": st.speculation,
            "drafters": st.drafters, "prompt_entries_read": st.n_selected, "time_to_first_token_s":
            None if st.time_first_token is None else round(st.time_first_token, 4)}


def _usage(handle) -> dict:
    n_prompt, n_new = handle.prompt_len, len(handle.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


class Server:
    """State shared by the routes: the engine worker, the tokenizer, the limits, the metrics."""

    def __init__(self, engine, tokenizer, cfg: ServeConfig, vision: bool):
        self.engine, self.tokenizer, self.cfg, self.vision = engine, tokenizer, cfg, vision
        self.metrics = Metrics()
        self.worker = EngineWorker(engine, cfg.max_queue, self.metrics)
        self.created = int(time.time())

    def check_auth(self, request: Request) -> None:
        if self.cfg.api_key and request.headers.get("authorization") != f"Bearer {self.cfg.api_key}":
            raise APIError("a valid API key is needed: Authorization: Bearer <key>", 401, "authentication_error")

    async def body(self, request: Request) -> dict:
        self.check_auth(request)
        raw = await request.body()
        if len(raw) > self.cfg.max_body_mb * 2**20:
            raise APIError(f"the request body is larger than {self.cfg.max_body_mb:g} MB", 413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        if body.get("model") != self.cfg.model_name:
            raise APIError(f"the model `{body.get('model')}` does not exist; this server serves "
                           f"`{self.cfg.model_name}`", 404, "not_found_error", "model", "model_not_found")
        return body

    async def generate(self, request: Request, prepared: protocol.Prepared, chat: bool):
        stream = Stream(asyncio.get_running_loop())
        try:
            handle = self.worker.submit(prepared.prompt_ids, stream, **prepared.submit)
        except AdmissionError as exc:
            raise APIError(str(exc)) from None
        except ValueError as exc:
            raise APIError(str(exc)) from None
        text = TextStream(self.tokenizer, prepared.stop)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if prepared.stream:
            return StreamingResponse(self._events(request, stream, handle, text, rid, chat, prepared.include_usage),
                                     media_type="text/event-stream")
        return JSONResponse(await self._whole(request, stream, handle, text, rid, chat))

    async def _finished(self, stream: Stream, handle, text: TextStream, request: Request):
        """Yield text pieces until the request ends; a client that goes away cancels it."""
        try:
            while True:
                try:
                    new = await asyncio.wait_for(stream.next(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.worker.cancel(handle)
                    continue
                if new is None:
                    if handle.done:
                        break
                    continue
                piece = text.push(new)
                if text.stopped:
                    self.worker.cancel(handle)  # the stop string is complete: no need to go on
                if piece:
                    yield piece
            tail = text.finish()
            if tail:
                yield tail
        finally:
            if not handle.done:
                self.worker.cancel(handle)
            else:
                self.metrics.observe_request(handle)

    def _reason(self, handle, text: TextStream) -> str:
        if text.stopped:
            return "stop"
        return _FINISH.get(handle.finish_reason, "stop")

    async def _whole(self, request, stream, handle, text, rid: str, chat: bool) -> dict:
        pieces = [p async for p in self._finished(stream, handle, text, request)]
        if handle.finish_reason == "error" and not text.stopped:
            raise APIError(handle.error or "the request failed")
        content, reason = "".join(pieces), self._reason(handle, text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                  if chat else {"index": 0, "text": content, "logprobs": None, "finish_reason": reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.cfg.model_name, "choices": [choice], "usage": _usage(handle),
                "sparse2dense": _std_stats(handle)}

    async def _events(self, request, stream, handle, text, rid: str, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(delta=None, reason=None, **extra) -> str:
            choice = ({"index": 0, "delta": delta or {}, "finish_reason": reason} if chat
                      else {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None,
                            "finish_reason": reason})
            body = {"id": rid, "object": kind, "created": created, "model": self.cfg.model_name, "choices": [choice],
                    **extra}
            return f"data: {json.dumps(body)}\n\n"

        if chat:
            yield chunk({"role": "assistant", "content": ""})
        async for piece in self._finished(stream, handle, text, request):
            yield chunk({"content": piece})
        if handle.finish_reason == "error" and not text.stopped:
            yield f"data: {json.dumps(APIError(handle.error or 'the request failed').body())}\n\n"
        else:
            yield chunk(reason=self._reason(handle, text), sparse2dense=_std_stats(handle))
        if include_usage:
            body = {"id": rid, "object": kind, "created": created, "model": self.cfg.model_name, "choices": [],
                    "usage": _usage(handle)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def build_app(engine, tokenizer, cfg: ServeConfig, vision: bool = False, processor=None) -> FastAPI:
    """The FastAPI app serving ``engine`` (see the module docstring); the engine thread runs while
    the app does, and a shutdown lets running requests finish for ``cfg.shutdown_timeout_s``."""
    server = Server(engine, tokenizer, cfg, vision)

    @asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.worker.shutdown, cfg.shutdown_timeout_s)

    app = FastAPI(title="sparse2dense", lifespan=lifespan)
    app.state.server = server
    limit = int(cfg.max_body_mb * 2**20)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(APIError(f"the request body is larger than {cfg.max_body_mb:g} MB", 413), server)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc, server)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(str(exc.detail), exc.status_code, kind), server)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return _error(APIError(f"internal error: {type(exc).__name__}: {exc}", 500, "server_error"), server)

    @app.get("/health")
    async def health():
        if server.worker.error is not None:
            return JSONResponse({"status": "degraded", "error": server.worker.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        server.check_auth(request)
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        card = {"id": cfg.model_name, "object": "model", "created": server.created, "owned_by": "sparse2dense",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await server.body(request)
        prepared = await asyncio.get_running_loop().run_in_executor(
            None, protocol.chat, body, tokenizer, engine.model, cfg, engine.max_seq_len, vision, processor)
        return await server.generate(request, prepared, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await server.body(request)
        prepared = protocol.completion(body, tokenizer, engine.model, cfg, engine.max_seq_len)
        return await server.generate(request, prepared, chat=False)

    return app


def _error(exc: APIError, server: Server) -> JSONResponse:
    if 400 <= exc.status < 500:
        server.metrics.rejected.labels(str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
