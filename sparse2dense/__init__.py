"""sparse2dense: lossless Sparse-to-Dense self-speculative decoding for Hugging Face models.

The same model drafts tokens with attention over a small selected part of its KV cache (sparse
mode) and verifies them in one pass with full attention (dense mode); the output is token for token
what greedy dense decoding produces.

Public names:

* :func:`generate`: ``sparse2dense.generate(model, input_ids, ..., max_new_tokens=...)``.
* :func:`custom_generate`: ``model.generate(**inputs, custom_generate=sparse2dense.custom_generate)``.
* :class:`Engine`: a batch of requests that join and leave while it decodes
  (``engine.submit(...)``, ``engine.step()``, ``engine.run()``, ``engine.cancel(handle)``).
* :class:`StdConfig`, :class:`StdOutput`, :class:`StdStats`, :class:`RequestStats`, :class:`Handle`,
  :class:`AdmissionError`, :func:`supported_models`.
"""

from .adapters import UnsupportedModelError, supported_models
from .config import StdConfig
from .engine import Engine
from .generation import generate
from .hf import custom_generate
from .requests import AdmissionError, Handle
from .stats import RequestStats, StdOutput, StdStats

__version__ = "0.1.0"

__all__ = [
    "AdmissionError",
    "Engine",
    "Handle",
    "RequestStats",
    "StdConfig",
    "StdOutput",
    "StdStats",
    "UnsupportedModelError",
    "custom_generate",
    "generate",
    "supported_models",
    "__version__",
]
