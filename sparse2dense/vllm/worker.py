"""``StDWorker``: vLLM's CPU worker, with the model runner handed to the StD proposer.

``--worker-cls sparse2dense.vllm.StDWorker`` is the one hook vLLM 0.32 offers that reaches the
model runner: a ``custom_class`` proposer is built with the config alone and is given the target
model, but not the batch's request ids and prompt lengths (see ``docs/vllm.md``).
"""

from __future__ import annotations

from . import check_version

check_version()

from vllm.v1.worker.cpu_worker import CPUWorker  # noqa: E402


class StDWorker(CPUWorker):
    """A :class:`CPUWorker` whose runner's ``StDProposer`` knows the runner."""

    def init_device(self) -> None:
        super().init_device()
        drafter = getattr(self.model_runner, "drafter", None)
        if drafter is not None and hasattr(drafter, "attach"):
            drafter.attach(self.model_runner)
