"""The loop: ``n`` steps of a :class:`~distvi.driver.step.Step` over a backend, with hooks."""

from __future__ import annotations

from collections.abc import Sequence

from distvi.driver.fused import FusedStep, block_hooks, first_bad
from distvi.driver.hooks import Hook
from distvi.driver.state import DriverState
from distvi.driver.step import Step


class Loop:
    """Runs steps; :attr:`state` is always the last whole state, also after an error (a
    step that fails leaves it as it was before that step).

    With ``fused`` (a :class:`~distvi.driver.fused.FusedStep`), the steps run through its
    compiled block, in blocks of as many steps as the hooks' horizons, the block's time
    budget and the steps left allow. When a hook must see every step (one without
    ``horizon``, such as a callback without ``call_every``), the whole run goes step by
    step instead: a block of one step costs more than a step (its inputs and outputs cross
    into the block's program), and the numbers agree to rounding."""

    def __init__(self, step: Step, backend, hooks: Sequence[Hook] = (),
                 fused: FusedStep | None = None) -> None:
        self.step, self.backend, self.hooks, self.fused = step, backend, list(hooks), fused
        self.state: DriverState | None = None

    def run(self, state: DriverState, n: int) -> DriverState:
        """``n`` steps from ``state``, fewer when a hook raises ``StopIteration``."""
        self.state = state
        try:
            if self.fused is None or not block_hooks(self.hooks):
                self._steps(state, n)
            else:
                self._blocks(state, n)
        except StopIteration:
            pass
        return self.state

    def _steps(self, state: DriverState, n: int) -> None:
        step, backend, hooks = self.step, self.backend, self.hooks
        points = step.draw(state)
        for _ in range(n):
            answers = backend.evaluate(points, state.step, step.with_logp)
            phi = step.direction(points, answers, backend)
            state, info, points = step.update(state, points, answers, phi)
            self.state = state
            for hook in hooks:
                hook(state, info)

    def _blocks(self, state: DriverState, n: int) -> None:
        fused, backend, hooks = self.fused, self.backend, self.hooks
        done = 0
        while done < n:
            k = max(1, min([n - done, fused.block_size(), *(h.horizon(state) for h in hooks)]))
            new, info, ok = fused.run(state, k)
            bad = first_bad(ok)
            if bad is not None or info.k == 0:
                if not bad:  # the first step is not finite (or its rate is not valid)
                    fused.fail(state, backend)
                new, info, ok = fused.run(state, bad)  # the finite steps before it
            state = self.state = new
            done += info.k
            for hook in hooks:
                hook.block(state, info)
