"""The engine's own thread, and the bridge from its rounds to the server's asyncio handlers.

:class:`EngineWorker` steps the :class:`~sparse2dense.Engine` in one thread for as long as
anything is waiting or decoding; handlers :meth:`~EngineWorker.submit` from the event loop and
read :class:`Stream` events: the token ids each round committed, then the end. A client that
disconnects cancels its request; its row leaves the batch at the next round boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ..requests import Handle
from .errors import APIError

log = logging.getLogger("sparse2dense.serve")


class Stream:
    """What one request's handler reads: ``await stream.next()`` gives new token ids, or None at the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle: Handle | None = None

    def callback(self, handle: Handle, new: list[int]) -> None:  # runs in the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, list(new) if new else None)

    async def next(self) -> list[int] | None:
        item = await self.queue.get()
        while item is not None and not self.queue.empty():  # coalesce what has piled up
            more = self.queue.get_nowait()
            if more is None:
                self.queue.put_nowait(None)
                break
            item = item + more
        return item


class EngineWorker:
    """Runs ``engine.step()`` in a daemon thread; see the module docstring."""

    def __init__(self, engine, max_queue: int, metrics=None):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.accepting = True
        self.thread = threading.Thread(target=self._loop, name="sparse2dense-engine", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.pending():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # an engine bug: keep serving, say what happened
                log.exception("engine step failed")
                self.error = f"{type(exc).__name__}: {exc}"
                self.engine.abort("the engine failed; please retry")
            if self.metrics is not None:
                self.metrics.observe_engine(self.engine)

    def submit(self, prompt_ids, stream: Stream, **kwargs) -> Handle:
        """Queue a request (from the event loop); 429 past the queue bound, 503 when shutting down."""
        if not self.accepting:
            raise APIError("the server is shutting down", 503, "server_error")
        if len(self.engine.waiting) >= self.max_queue:
            raise APIError(f"the server's queue is full ({self.max_queue} waiting); retry shortly", 429,
                           "rate_limit_error", headers={"Retry-After": "1"})
        handle = self.engine.submit(prompt_ids, callback=stream.callback, **kwargs)
        stream.handle = handle
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        if not handle.done:
            self.engine.cancel(handle)
            self._wake.set()

    def drain(self, timeout_s: float) -> None:
        """Stop accepting; let running requests finish for up to ``timeout_s``; cancel the rest and
        wait (a few seconds at most) for them to end."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while self.engine.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        for group in list(self.engine.waiting) + list(self.engine.groups):
            for h in group.handles:
                self.engine.cancel(h)
        self._wake.set()
        deadline = time.monotonic() + 5.0
        while self.engine.pending() and time.monotonic() < deadline:
            time.sleep(0.02)

    def shutdown(self, timeout_s: float) -> None:
        """:meth:`drain`, then stop the engine thread."""
        self.drain(timeout_s)
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=5.0)
