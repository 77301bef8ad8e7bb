"""Measuring sparse2dense against dense decoding on the same model, inputs and machine.

The timing helpers live in :mod:`sparse2dense.timing` (the demo uses them too); this package holds
the sweeps (:mod:`.suite`), the step costs (:mod:`.steps`), the kernels (:mod:`.kernels`) and the
README's speed table (:mod:`.speed`).
"""

from ..timing import MethodResult, compare_methods, time_hf_generate

__all__ = ["MethodResult", "compare_methods", "time_hf_generate"]
