"""The server's settings, validated once at start (``sparse2dense serve --help`` documents each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class ServeConfig:
    """Limits and safety settings of ``sparse2dense serve``.

    Attributes:
        model_name: the id clients send as ``model`` (``GET /v1/models`` lists it).
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``.
        allowed_media_dir: local media files are read only below this folder (None: never).
        allow_remote_media: fetch ``http(s)://`` media URLs (off by default).
        max_queue: requests waiting for a slot before new ones get 429.
        max_body_mb: the largest request body accepted.
        max_frames: frames sampled from a video at most (a request's ``max_frames`` may lower it).
        max_pixels: the largest frame (width x height) accepted.
        max_prompt_tokens: the longest prompt accepted (default: the engine's ``max_seq_len`` - 1).
        default_max_tokens: new tokens when a request gives no ``max_tokens``.
        shutdown_timeout_s: on SIGTERM, how long running requests may take to finish before they
            are cancelled.
    """

    model_name: str
    api_key: str | None = None
    allowed_media_dir: Path | None = None
    allow_remote_media: bool = False
    max_queue: int = 64
    max_body_mb: float = 64.0
    max_frames: int = 32
    max_pixels: int = 1920 * 1080
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 256
    shutdown_timeout_s: float = 10.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_frames", "max_pixels", "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not self.max_body_mb > 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb}.")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}.")
        if self.allowed_media_dir is not None:
            folder = Path(self.allowed_media_dir).expanduser().resolve()
            if not folder.is_dir():
                raise ValueError(f"--allowed-media-dir is not a folder: {self.allowed_media_dir}")
            self.allowed_media_dir = folder
