"""The loop: ``n`` steps of a :class:`~distvi.driver.step.Step` over a backend, with hooks."""

from __future__ import annotations

from collections.abc import Sequence

from distvi.driver.hooks import Hook
from distvi.driver.state import DriverState
from distvi.driver.step import Step


class Loop:
    """Runs steps; :attr:`state` is always the last whole state, also after an error (a
    step that fails leaves it as it was before that step)."""

    def __init__(self, step: Step, backend, hooks: Sequence[Hook] = ()) -> None:
        self.step, self.backend, self.hooks = step, backend, list(hooks)
        self.state: DriverState | None = None

    def run(self, state: DriverState, n: int) -> DriverState:
        """``n`` steps from ``state``, fewer when a hook raises ``StopIteration``."""
        step, backend, hooks = self.step, self.backend, self.hooks
        self.state = state
        points = step.draw(state)
        try:
            for _ in range(n):
                answers = backend.evaluate(points, state.step, step.with_logp)
                phi = step.direction(points, answers, backend)
                state, info, points = step.update(state, points, answers, phi)
                self.state = state
                for hook in hooks:
                    hook(state, info)
        except StopIteration:
            pass
        return self.state
