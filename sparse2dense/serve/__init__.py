"""``sparse2dense serve``: an OpenAI-compatible server over the request-level engine.

Needs the ``serve`` extra (``pip install 'sparse2dense[serve]'``: FastAPI, uvicorn,
prometheus-client). :func:`build_app` makes the FastAPI app for an :class:`~sparse2dense.Engine`;
the command line starts it with uvicorn.
"""

from .app import build_app
from .config import ServeConfig
from .errors import APIError

__all__ = ["APIError", "ServeConfig", "build_app"]
