"""Measuring sparse2dense against dense decoding on the same model, inputs and machine."""

from .compare import MethodResult, compare_methods, time_hf_generate

__all__ = ["MethodResult", "compare_methods", "time_hf_generate"]
