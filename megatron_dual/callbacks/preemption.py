"""Preemption and interrupts: SIGTERM, SIGUSR1 (SLURM's ``--signal=USR1@90``) and a first Ctrl-C end the run at the
end of the current step, with a checkpoint (:class:`~megatron_dual.callbacks.checkpointing.Checkpointer`), and
``megatron-dual train`` exits 0 with one line. A second Ctrl-C aborts at once (one line, no traceback).

The handler only records the request (:meth:`Trainer.request_stop`); the loop checks it between steps, and with
several ranks the flag is all-reduced, so every rank stops after the same step even when only one got the signal.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from megatron_dual.callbacks.base import Callback

__all__ = ["StopOnSignal", "SIGNAL_NAMES"]

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1", signal.SIGINT: "Ctrl-C (SIGINT)"}


class StopOnSignal(Callback):
    """Installs the handlers for the length of the run (main thread only) and restores the previous ones."""

    priority = 200

    def __init__(self) -> None:
        super().__init__()
        self._previous: dict[int, Any] = {}
        self._interrupts = 0

    def pre_train(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNAL_NAMES:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt("a second Ctrl-C")
        self.trainer.request_stop(SIGNAL_NAMES.get(signum, f"signal {signum}"))

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
