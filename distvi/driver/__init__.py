"""The driver: the state of a run, the step that advances it, the loop, and its hooks.

One step, top to bottom (see :func:`distvi.driver.loop.run`)::

    points  = step.draw(state)                               # compiled, pure
    answers = backend.evaluate(points, state.step)           # sum_k (N_k/B_k) (logp, grad)
    phi     = step.direction(points, answers, backend)       # KSD only: an explicit phase
    state, info, points = step.update(state, points, answers, phi)   # compiled, pure
    for hook in hooks: hook(state, info)                     # traces, recorder, progress, ...
"""
