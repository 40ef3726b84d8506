"""Signals during a fit: SIGINT and SIGTERM end it at a step boundary, with the state whole."""

from __future__ import annotations

import signal
import threading
from typing import Any

from distvi.driver.hooks import NO_LIMIT
from distvi.driver.state import DriverState


class DeferredSignals:
    """SIGINT and SIGTERM during a fit, held until the step ends.

    A signal is noted, and the loop stops at the next step boundary: the state is whole, the
    final checkpoint is written and the MLflow run is closed as KILLED. A second SIGINT does
    not wait (a step that never ends can still be interrupted). Handlers can only be set in
    the main thread; elsewhere signals keep their usual behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forced = False  # a second SIGINT: stop now, keep the last committed checkpoint
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> DeferredSignals:
        return self.arm()

    def arm(self) -> DeferredSignals:
        """Set the handlers (again after ``ray.init``, whose own SIGTERM handler aborts the
        process); the handlers to restore are those from before the first call."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._note)
                self.saved.setdefault(sig, previous)
        return self

    def _note(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def deliver(self) -> None:
        """After the clean stop: SIGTERM is handled as the process would have handled it
        (by default: exit with status 128 + 15, running ``finally`` blocks and ``atexit``);
        SIGINT ends the fit early and the fit returns, as in PyMC."""
        if self.signum != signal.SIGTERM:
            return
        previous = self.saved.get(signal.SIGTERM, signal.SIG_DFL)
        if callable(previous):
            previous(self.signum, None)
        elif previous != signal.SIG_IGN:  # the default (or a handler set outside Python)
            raise SystemExit(128 + self.signum)


def report_stop(name: str, step: int, url: str | None) -> None:
    """Say on stderr that a signal stopped the fit, and where the run stands."""
    import sys

    from distvi.redact import redact

    where = (f"; the run store {url} has a checkpoint at this step: distvi.resume({url!r}, ...)"
             if url is not None else "")
    print(redact(f"distvi: {name} received: the fit stopped after step {step}{where}"),
          file=sys.stderr, flush=True)


class StopOnSignal:
    """A hook: ends the run at the step boundary after a signal was noted."""

    def __init__(self, signals: DeferredSignals) -> None:
        self.signals = signals

    def __call__(self, state: DriverState, info) -> None:
        if self.signals.signum is not None:
            raise StopIteration

    @staticmethod
    def horizon(state: DriverState) -> int:
        return NO_LIMIT

    def block(self, state: DriverState, info) -> None:
        self(state, info)
