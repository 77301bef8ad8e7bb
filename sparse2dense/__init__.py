"""sparse2dense: lossless Sparse-to-Dense self-speculative decoding for Hugging Face models.

The same model drafts tokens with attention over a small selected part of its KV cache (sparse
mode) and verifies them in one pass with full attention (dense mode); the output is token for token
what greedy dense decoding produces.

Public names:

* :func:`generate`: ``sparse2dense.generate(model, input_ids, ..., max_new_tokens=...)``.
* :func:`custom_generate`: ``model.generate(**inputs, custom_generate=sparse2dense.custom_generate)``.
* :class:`StdConfig`, :class:`StdOutput`, :class:`StdStats`, :func:`supported_models`.
"""

from .adapters import UnsupportedModelError, supported_models
from .config import StdConfig
from .engine import StdOutput, StdStats, generate
from .hf import custom_generate

__version__ = "0.1.0"

__all__ = [
    "StdConfig",
    "StdOutput",
    "StdStats",
    "UnsupportedModelError",
    "custom_generate",
    "generate",
    "supported_models",
    "__version__",
]
