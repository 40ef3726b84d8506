"""Runs: ``fit`` (PyMC's entry point), ``resume`` and ``open_run`` on a run store, and the
Inference a store's config describes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distvi import _validate, optimizers
from distvi.approximations import Approximation
from distvi.inference import Inference
from distvi.methods import ADVI, ASVGD, SVGD, FullRankADVI
from distvi.rebuild import rebuilt_model_and_data
from distvi.recording import check_matches
from distvi.store import Run, RunStore, StoreError


METHODS: dict[str, type[Inference]] = {"advi": ADVI, "fullrank_advi": FullRankADVI,
                                       "svgd": SVGD, "asvgd": ASVGD}


def fit(n: int = 10000, method: str | Inference = "advi", model: Any = None,
        random_seed: int | None = None, start: dict | None = None, start_sigma: dict | None = None,
        inf_kwargs: dict | None = None, *, data: Any = None, batch_size: int | None = None,
        num_workers: int | None = None, backend: str | None = None, address: str | None = None,
        backend_options: dict | None = None, local: dict | None = None,
        **kwargs: Any) -> Approximation:
    """Fit an approximation, as ``pymc.fit`` does, on sharded data.

    Parameters
    ----------
    n
        Number of steps; ``None`` (or ``"auto"``): until converged (see
        :meth:`Inference.fit`).
    method
        ``"advi"``, ``"fullrank_advi"``, ``"svgd"``, ``"asvgd"``, or an :class:`Inference`
        instance.
    model
        A factory ``model(data) -> pm.Model``, a ready ``pm.Model``, or ``None`` for the
        model on the context stack.
    random_seed, start, start_sigma
        As in PyMC.
    inf_kwargs
        Extra keywords for the Inference class (e.g. ``beta``, ``stl``).
    data, batch_size, num_workers, backend, address, local
        Where the rows are and how they are split, and the local variables (see
        :class:`Inference`).
    **kwargs
        Passed to :meth:`Inference.fit` (``obj_optimizer``, ``obj_n_mc``,
        ``total_grad_norm_constraint``, ``callbacks``, ``progressbar``, ``score``, and the
        run keywords ``store``, ``checkpoint_every``, ``resume``, ``tracking``).

    Returns
    -------
    Approximation

    Examples
    --------
    >>> approx = fit(2000, model=factory, data={"x": x}, random_seed=1)   # doctest: +SKIP
    >>> idata = approx.sample(1000)                                      # doctest: +SKIP
    """
    if n is not None and not (isinstance(n, str) and n == "auto"):  # n=None: Inference.fit checks
        n = _validate.steps(n)
    inf_kwargs = dict(inf_kwargs or {})
    if isinstance(method, Inference):
        given = {k: v for k, v in dict(model=model, random_seed=random_seed, start=start,
                                        start_sigma=start_sigma, inf_kwargs=inf_kwargs or None,
                                        data=data, batch_size=batch_size, num_workers=num_workers,
                                        backend=backend, address=address,
                                        backend_options=backend_options, local=local).items()
                 if v is not None}
        if given:
            raise TypeError(f"method is an Inference instance, which already has its settings; "
                            f"{sorted(given)} would be ignored")
        inference = method
    elif isinstance(method, str):
        key = method.lower()
        if key not in METHODS:
            raise KeyError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}")
        if start is not None:
            inf_kwargs["start"] = start
        if start_sigma is not None:
            inf_kwargs["start_sigma"] = start_sigma
        inference = METHODS[key](model=model, data=data, batch_size=batch_size,
                                 num_workers=num_workers, backend=backend, address=address,
                                 random_seed=random_seed, backend_options=backend_options,
                                 local=local, **inf_kwargs)
    else:
        raise TypeError(f"method must be a str or an Inference instance, got {type(method).__name__}")
    if inference is method:
        return inference.fit(n, **kwargs)
    with inference:  # the workers of a one-shot fit are released on exit, error or Ctrl-C
        return inference.fit(n, **kwargs)


REBUILDABLE = {"ADVI": ADVI, "FullRankADVI": FullRankADVI, "SVGD": SVGD, "ASVGD": ASVGD}


def build_inference(config: dict[str, Any], model: Any, data: Any = None, **overrides: Any) -> Inference:
    """The Inference a run store's ``config`` describes, on ``model`` and ``data``
    (``overrides`` replace recorded settings, e.g. ``backend`` or ``address``)."""
    method = config.get("method")
    if method not in REBUILDABLE:
        raise StoreError(f"a {method!r} run is not rebuilt from its store: build the Inference "
                         f"yourself and call its fit(..., store=..., resume=True)")
    settings = dict(config.get("inference", {}))
    if isinstance(settings.get("shard_kernel_above"), str):
        settings["shard_kernel_above"] = float(settings["shard_kernel_above"])
    settings.update(overrides)
    return REBUILDABLE[method](model=model, data=data, **settings)


def recorded_optimizer(fit_config: dict[str, Any]) -> optimizers.Optimizer:
    """The optimizer a run store records (a schedule cannot be recorded: it is refused)."""
    opt = fit_config["optimizer"]
    hyper = dict(opt["hyper"])
    if isinstance(hyper.get("learning_rate"), str):
        raise StoreError("the run used a learning-rate schedule, which a store cannot hold: "
                         "pass the same obj_optimizer= to resume it")
    return optimizers.Optimizer(opt["name"], hyper)


def resume(store: Any, n: int | None = None, model: Any = None, data: Any = None, *,
           obj_optimizer=None, callbacks: Sequence[Callable] | None = None,
           progressbar: bool = True, tracking: Any = None, **overrides: Any) -> Approximation:
    """Continue the run in ``store`` from its last checkpoint until it has ``n`` steps
    (default: the ``n`` it was started with); the store refuses a model or data other than
    it was written for.

    Without ``model=``, the model factory is imported by the ``module:qualname`` the store
    records (a factory defined in ``__main__``, a lambda or closure, or a ready ``pm.Model``
    has none: the error says to pass ``model=``); without ``data=``, a Zarr or Parquet source
    is opened again by the path it records (in-memory arrays must be given again). This
    imports and runs code a store names: resume only stores you trust.

    Examples
    --------
    >>> approx = resume("runs/logreg.zarr", model=factory, data=source)   # doctest: +SKIP
    >>> approx = resume("runs/logreg.zarr")      # an importable factory, Zarr data  # doctest: +SKIP
    """
    rs = RunStore.open(store)
    attrs = rs.attrs
    config = attrs["config"]
    fit_config = config["fit"]
    if n is None and fit_config["n"] is None:
        raise StoreError(f"run store {rs.url!r} was a fit run until converged (n=None), which is "
                         "not checkpointed phase by phase: give resume() a number of steps n "
                         "to continue it with a fixed n")
    total = fit_config["n"] if n is None else _validate.steps(n)
    opt = obj_optimizer if obj_optimizer is not None else recorded_optimizer(fit_config)
    if fit_config.get("checkpoint_every") is None:
        raise StoreError(f"run store {rs.url!r} has no checkpoint interval recorded")
    model, data = rebuilt_model_and_data(rs.url, attrs, model, data)
    inference = build_inference(config, model, data, **overrides)
    with inference:
        return inference.fit(total, callbacks=callbacks, progressbar=progressbar,
                             obj_n_mc=fit_config["obj_n_mc"], obj_optimizer=opt,
                             total_grad_norm_constraint=fit_config["total_grad_norm_constraint"],
                             average_from=fit_config.get("average_from"),
                             store=store, resume=True, tracking=tracking)


def open_run(store: Any, model: Any = None, data: Any = None) -> Run:
    """Read a run store: config, traces, last checkpoint, and (given the model, and the data
    for a factory) the approximation at the last checkpoint.

    Examples
    --------
    >>> run = open_run("runs/logreg.zarr", model=factory, data=source)   # doctest: +SKIP
    >>> run.traces["loss"], run.approximation.mean                       # doctest: +SKIP
    """
    rs = RunStore.open(store)
    attrs = rs.attrs
    ckpt = rs.last_checkpoint()
    run = Run(rs.url, attrs["config"], attrs["layout"], attrs["data"], attrs.get("versions", {}),
              str(attrs.get("status", "unknown")), rs.checked_traces(None if ckpt is None else ckpt.n_trace), ckpt,
              diagnosis=attrs.get("diagnosis") if isinstance(attrs.get("diagnosis"), dict) else None,
              posterior_sha256=attrs.get("posterior_sha256") if isinstance(attrs.get("posterior_sha256"), str) else None)
    if model is not None:
        inference = build_inference(attrs["config"], model=model, data=data)
        check_matches(rs, inference)
        if ckpt is not None:  # the averaged parameters when the run averages its iterates
            inference.approx.params_values = [np.array(p) for p in (ckpt.average or ckpt.params)]
        run.approximation = inference.approx
    return run
