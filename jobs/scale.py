"""Scale: logistic regression on synthetic rows in a Zarr group that the workers read.

The generator writes ``--rows`` x ``--cols`` (default 10,000,000 x 50) rows of synthetic
logistic-regression data to a Zarr v3 group: ``X`` float32 (chunks of 20,000 full rows, 4 MB,
uncompressed: random floats do not compress), ``y`` int8 (0/1), and in the group's attributes
the true weights and intercept and the posterior sds of a Laplace approximation at them (from
the Fisher information, summed chunk by chunk). It writes one chunk at a time, chunk ``i``
from its own seeded stream, so memory stays at one chunk; it skips the work when a complete
group with the same shape, seed and chunking is there already, replaces a group it wrote
itself for another size, and refuses to overwrite anything else. Then the fit runs as
``configs/scale.yaml`` says: two Ray workers, each reading its own row range of the group
(the driver reads only metadata), minibatches of 2,000 rows per worker, 10,000 steps.

Measured on a shared 2-core machine (load 3-4 from other work; one run each):

- generation: 1.7-1.9 s per million rows of 50 columns (200 MB of float32 X a million):
  10 M rows (1.9 GB on disk) in 17.3 s, once;
- the default fit on 10 M rows: 119 s wall in all, of which 17 s generating, 47 s stepping
  (214 steps/s of 4,000 rows: 0.86 M rows/s; the step time is Ray round trips, not the
  rows), the rest imports, starting Ray, each worker reading its 5 M-row shard (1 GB) and
  compiling, and the summary. The driver's memory peaks at 0.65 GB;
- 1 M rows (``--rows 1000000``): 83 s wall, 1.9 s generating, 38 s stepping (261 steps/s,
  1.0 M rows/s).

The report measures the error of q's mean against the true weights in units of the
posterior sd (Laplace at the truth); with exact inference the largest of the 51 errors is
about 2-3 and the median about 0.7 (the truth is one draw away from the posterior mean).
Measured: 1 M rows max 2.9, median 0.69, q's sd 0.84-1.6 x the posterior sd; 10 M rows max
3.5, median 1.1, q's sd 1.5-5 x (the sd of q comes down slowly once the posterior is this
narrow: more steps help).

    python jobs/scale.py                                  # 10 M x 50, configs/scale.yaml
    python jobs/scale.py --rows 1000000 --cols 50 --data-path runs/scale-1m.zarr
    python jobs/scale.py --rows 200000 --cols 20 --data-path /tmp/s.zarr --set n=2000
    ray job submit --working-dir . -- python jobs/scale.py --data-path /shared/scale.zarr \\
        --config configs/scale_cluster.yaml --set store=/shared/runs/scale-{timestamp}.zarr

The job's own flags (``--rows``, ``--cols``, ``--data-path``, ``--seed``, ``--chunk-rows``) go
first; ``--config`` and ``--set`` follow as ``distvi run`` takes them (``data.path`` is set
from ``--data-path``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pymc as pm
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `jobs.` and `distvi` from a checkout

INTERCEPT = -0.5
PRIOR_SD_INTERCEPT = 2.0
GENERATOR = "distvi jobs/scale.py"
FORMAT = 3  # bump when the generator changes what it writes


def _chunk_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(i,))))


def true_weights(cols: int, seed: int) -> np.ndarray:
    """The weights the data are drawn with: N(0, 1) scaled by 2/sqrt(cols), so the linear
    predictor has sd about 2 whatever the width."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    return rng.normal(size=cols) * (2.0 / np.sqrt(cols))


def _complete(path: str, rows: int, cols: int, seed: int, chunk_rows: int) -> bool:
    import zarr

    try:
        g = zarr.open_group(path, mode="r")
        a = dict(g.attrs)
        return (a.get("generator") == GENERATOR and a.get("complete") is True
                and a.get("format") == FORMAT and a.get("seed") == seed
                and a.get("chunk_rows") == chunk_rows and tuple(g["X"].shape) == (rows, cols)
                and tuple(g["y"].shape) == (rows,))
    except Exception:  # missing, partial or foreign: generate
        return False


def _exists(path: str) -> bool:
    if "://" not in path:
        return os.path.lexists(path)
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


def _ours(path: str) -> bool:
    import zarr

    try:
        return zarr.open_group(path, mode="r").attrs.get("generator") == GENERATOR
    except Exception:
        return False


def generate(path: str, rows: int, cols: int, seed: int = 0, chunk_rows: int = 20_000) -> bool:
    """Write the data to the Zarr group at ``path``, unless a complete group with the same
    shape, seed and chunking is there already. A group this function wrote before (other
    shape or seed, or unfinished) is replaced; anything else at ``path`` is refused. Returns
    True if it wrote."""
    import zarr

    if rows < 1 or cols < 1 or chunk_rows < 1:
        raise ValueError(f"rows, cols and chunk_rows must be >= 1, got {rows}, {cols}, {chunk_rows}")
    path = str(path)
    if _complete(path, rows, cols, seed, chunk_rows):
        return False
    if _exists(path) and not _ours(path):
        raise FileExistsError(f"{path!r} exists and was not written by jobs/scale.py: "
                              f"not replacing it (give another --data-path)")
    w = true_weights(cols, seed)
    g = zarr.open_group(path, mode="w", zarr_format=3)
    g.attrs.update({"generator": GENERATOR, "complete": False})  # True last: a partial write is redone
    X = g.create_array("X", shape=(rows, cols), chunks=(chunk_rows, cols), dtype="float32",
                       compressors=None, fill_value=0.0)
    y = g.create_array("y", shape=(rows,), chunks=(chunk_rows,), dtype="int8", fill_value=0)
    with threadpool_limits(1):  # small products: BLAS threads only contend on a busy box
        info = _write_chunks(X, y, w, seed, chunk_rows)
    sd = np.sqrt(np.diag(np.linalg.inv(info)))
    g.attrs.update({"format": FORMAT, "seed": seed, "rows": rows, "cols": cols,
                    "chunk_rows": chunk_rows, "true_w": w.tolist(), "true_intercept": INTERCEPT,
                    "laplace_sd_intercept": float(sd[0]), "laplace_sd_w": sd[1:].tolist(),
                    "complete": True})
    return True


def _write_chunks(X, y, w: np.ndarray, seed: int, chunk_rows: int) -> np.ndarray:
    """Fill X and y one chunk at a time; returns the Fisher information at the true
    parameters plus the prior precisions, whose inverse's diagonal is the Laplace posterior
    variance (the yardstick the report measures errors with)."""
    rows, cols = X.shape
    info = np.diag(np.r_[1.0 / PRIOR_SD_INTERCEPT**2, np.ones(cols)])
    w32 = w.astype(np.float32)
    for i, start in enumerate(range(0, rows, chunk_rows)):
        stop = min(start + chunk_rows, rows)
        rng = _chunk_rng(seed, i + 1)
        x = rng.standard_normal((stop - start, cols), dtype=np.float32)
        p = 1.0 / (1.0 + np.exp(-(x @ w32).astype(np.float64) - INTERCEPT))
        X[start:stop] = x
        y[start:stop] = (rng.random(stop - start) < p).astype(np.int8)
        root = np.sqrt(p * (1.0 - p)).astype(np.float32)
        xa = np.empty((stop - start, cols + 1), dtype=np.float32)  # float32: 4x faster
        xa[:, 0], xa[:, 1:] = root, x * root[:, None]
        info += (xa.T @ xa).astype(np.float64)
    return info


def _ncols(X) -> int:
    shape = X.type.shape if hasattr(X, "type") else X.shape  # symbolic minibatch or an array
    return int(shape[1])


def model(data):
    """Logistic regression: ``y ~ Bernoulli(logit = intercept + X @ w)``, ``w ~ N(0, 1)``."""
    cols = _ncols(data["X"])
    with pm.Model(coords={"coef": [f"x{j}" for j in range(cols)]}) as m:
        intercept = pm.Normal("intercept", 0.0, PRIOR_SD_INTERCEPT)
        w = pm.Normal("w", 0.0, 1.0, dims="coef")
        pm.Bernoulli("y", logit_p=intercept + data["X"] @ w, observed=data["y"])
    return m


def rows_per_step(inference) -> int:
    from distvi.data import source_bounds

    b = inference.batch_size
    return sum((hi - lo) if b is None else min(b, hi - lo)
               for lo, hi in source_bounds(inference.source, inference.num_workers))


def make_report(data_path: str, t_start: float, gen_s: float | None):
    def report(inference, cfg) -> None:
        import zarr

        attrs = dict(zarr.open_group(data_path, mode="r").attrs)
        mean, sd = inference.approx.mean_data, inference.approx.std_data
        est = np.r_[float(mean["intercept"]), np.asarray(mean["w"]).ravel()]
        q_sd = np.r_[float(sd["intercept"]), np.asarray(sd["w"]).ravel()]
        truth = np.r_[attrs["true_intercept"], attrs["true_w"]]
        ref_sd = np.r_[attrs["laplace_sd_intercept"], attrs["laplace_sd_w"]]
        z = np.abs(est - truth) / ref_sd
        worst = int(np.argmax(z))
        name = "intercept" if worst == 0 else f"w[{worst - 1}]"
        ratio = q_sd / ref_sd
        steps, per_step = inference.state.step, rows_per_step(inference)
        if cfg["store"]:
            from distvi import open_run

            fit_s = float(np.sum(open_run(cfg["store"]).traces["step_seconds"]))
            what = "step loop"
        else:
            fit_s, what = time.perf_counter() - t_start, "start + fit + summary"
        n_rows = inference.source.n_rows
        print(f"data        {n_rows:,} rows x {len(attrs['true_w'])} columns at {data_path}"
              + ("" if gen_s is None else f"  (generated in {gen_s:.1f} s, "
                 f"{gen_s / n_rows * 1e6:.2f} s per million rows)"))
        print(f"accuracy    max |q mean - true| / posterior sd = {z.max():.2f} ({name}), median "
              f"{np.median(z):.2f} (exact inference: max ~2-3 over {z.size}); posterior sd "
              f"(Laplace, at the truth) median {np.median(ref_sd):.3g}; q sd / posterior sd "
              f"{ratio.min():.2f}-{ratio.max():.2f}")
        print(f"throughput  {steps} steps x {per_step:,} rows / {fit_s:.1f} s ({what}) = "
              f"{steps * per_step / fit_s:,.0f} rows/s, {steps / fit_s:.0f} steps/s; "
              f"{time.perf_counter() - t_start:.1f} s since the job started")

    return report


def main(argv: list[str] | None = None) -> None:
    from distvi.cli import job_main

    parser = argparse.ArgumentParser(
        add_help=False, usage="%(prog)s [job flags] [--config CONFIG] [--set KEY=VALUE ...]",
        description="the job's own flags, before --config and --set:")
    parser.add_argument("--rows", type=int, default=10_000_000,
                        help="rows to generate (default 10,000,000)")
    parser.add_argument("--cols", type=int, default=50, help="columns of X (default 50)")
    parser.add_argument("--data-path", default="runs/scale-data.zarr",
                        help="the Zarr group (default runs/scale-data.zarr)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the data's seed (the fit's is in the config)")
    parser.add_argument("--chunk-rows", type=int, default=20_000, help="rows per chunk (default 20,000)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        print(parser.format_help())
        job_main(__doc__, "configs/scale.yaml", ["--help"])  # prints the rest and exits
    path = args.data_path
    if "://" not in path:  # absolute: workers may not share the driver's working directory
        path = os.path.abspath(path)
    t0 = time.perf_counter()
    try:
        written = generate(path, args.rows, args.cols, args.seed, args.chunk_rows)
    except (FileExistsError, ValueError) as err:
        sys.exit(f"scale: error: {err}")
    gen_s = time.perf_counter() - t0 if written else None
    print(f"data: {'wrote' if written else 'reusing'} {path} ({args.rows:,} x {args.cols})"
          + (f" in {gen_s:.1f} s" if written else ""), flush=True)
    job_main(__doc__, "configs/scale.yaml", rest + ["--set", f"data.path={json.dumps(path)}"],
             report=make_report(path, t0, gen_s))


if __name__ == "__main__":
    main()
