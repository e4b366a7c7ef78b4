"""SIGINT / SIGTERM during training: finish the step (or micro-batch), save, then stop."""

from __future__ import annotations

import signal
import threading
from typing import Any


class SignalHandlers:
    """Base of context managers that take SIGINT / SIGTERM with ``self._handle(signum, frame)``
    (which a subclass defines) inside and put the previous handlers back on exit. Outside the main thread (where Python
    cannot take signals) it installs nothing."""

    def __enter__(self):
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopOnSignal(SignalHandlers):
    """SIGINT / SIGTERM ask the loop to stop and save; a second signal aborts at once.

    A context manager: inside it ``requested`` is None until a signal arrives, then the
    signal's name (``signum`` its number); the previous handlers come back on exit. A second
    SIGINT raises ``KeyboardInterrupt``, a second SIGTERM ``SystemExit(143)`` (what an
    unhandled SIGTERM would have ended). Outside the main thread (where Python cannot take
    signals) it does nothing.
    """

    def __init__(self, *, announce: bool = True):
        self.announce = announce
        self.requested: str | None = None
        self.signum: int | None = None

    def _handle(self, signum, frame):
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested, self.signum = signal.Signals(signum).name, signum
        if self.announce:
            again = "Ctrl-C" if signum == signal.SIGINT else self.requested
            print(
                f"\n{self.requested}: saving a checkpoint after this step (or before it, if "
                f"its micro-batches are still running; {again} again to abort)",
                flush=True,
            )
