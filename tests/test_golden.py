"""Refactors keep numbers: every golden fit is bit-identical (``==``) to what it recorded, in
the environment it was recorded in; elsewhere, equal to the last bits a different libm,
BLAS or vector unit may change (``golden.ELSEWHERE_RTOL``).

The cases and how to record them are in ``tests/golden/golden.py``; a Ray case runs on the
session's local cluster.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import golden  # noqa: E402

RECORDED = json.loads(golden.GOLDEN.read_text())
RECORDED_IN = json.loads(golden.ENVIRONMENT.read_text()) if golden.ENVIRONMENT.exists() else None
SAME_ENVIRONMENT = RECORDED_IN == golden.environment()


def test_every_case_is_recorded():
    assert sorted(RECORDED) == sorted(c.__name__ for c in golden.CASES)


@pytest.mark.parametrize("case", golden.CASES, ids=lambda c: c.__name__)
def test_golden_fit_is_bit_identical(case, request):
    if case.__name__.startswith("ray_"):
        request.getfixturevalue("ray_cluster")
    got = golden.run(case)
    want = RECORDED[case.__name__]
    assert len(got["hist"]) == len(want["hist"])
    assert [p["shape"] for p in got["params"]] == [p["shape"] for p in want["params"]]
    if SAME_ENVIRONMENT:
        assert got["hist"] == want["hist"]
        assert got["params"] == want["params"]
        return
    rtol = golden.ELSEWHERE_RTOL
    np.testing.assert_allclose(got["hist"], want["hist"], rtol=rtol, atol=0)
    for g, w in zip(got["params"], want["params"]):
        np.testing.assert_allclose(g["values"], w["values"], rtol=rtol, atol=0)


def test_the_environment_check_tells_a_change_apart():
    env = golden.environment()
    assert env == golden.environment() and set(env["packages"]) == set(golden.PACKAGES)
    other = {**env, "packages": {**env["packages"], "numpy": "0.0"}}
    assert other != env
