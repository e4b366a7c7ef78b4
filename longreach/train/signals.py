"""SIGINT / SIGTERM during training: finish the step, save, then stop."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second SIGINT aborts.

    A context manager: inside it ``requested`` is None until a signal arrives, then the signal's
    name; the previous handlers come back on exit. Outside the main thread (where Python cannot
    take signals) it does nothing.
    """

    def __init__(self, *, announce: bool = True):
        self.announce = announce
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.announce:
            print(
                f"\n{self.requested}: saving a checkpoint after this step (Ctrl-C again to abort)",
                flush=True,
            )
