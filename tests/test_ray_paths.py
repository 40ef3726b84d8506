"""The direct path's wire (no Ray needed): answers arrive bit for bit, only the driver that
holds the token is served, and a failing, hung or vanished worker is reported, not waited on."""

import socket
import time

import numpy as np
import pytest

from distvi.backends.ray_paths import DirectPath, Line, PathFailed


def answer(rank):
    def evaluate(points, step, with_logp):
        grad = np.sin(points * (step + 1) + rank)
        logp = np.log1p(points.sum(axis=1) ** 2) if with_logp else np.zeros(points.shape[0])
        return logp, grad, 0.25 * rank
    return evaluate


def test_answers_arrive_bit_for_bit_in_rank_order():
    token = DirectPath.new_token()
    lines = [Line(answer(r), token, "127.0.0.1") for r in range(3)]
    path = DirectPath([line.address for line in lines], token, timeout_s=10)
    rng = np.random.default_rng(0)
    for step, dtype in [(0, np.float64), (7, np.float32), (8, np.float64)]:
        points = rng.normal(size=(4, 5)).astype(dtype)
        got = path.evaluate(points, step, with_logp=step != 8)
        for rank, (logp, grad, compute_s) in enumerate(got):
            want = answer(rank)(points, step, step != 8)
            assert logp.dtype == want[0].dtype and grad.dtype == want[1].dtype
            np.testing.assert_array_equal(logp, want[0])
            np.testing.assert_array_equal(grad, want[1])
            assert compute_s == 0.25 * rank
    path.close()
    # the line serves the next driver once this one has gone
    again = DirectPath([lines[0].address], token, timeout_s=10)
    np.testing.assert_array_equal(again.evaluate(np.ones((1, 2)), 3, True)[0][1],
                                  answer(0)(np.ones((1, 2)), 3, True)[1])


def test_a_connection_without_the_token_is_not_served():
    token = DirectPath.new_token()
    line = Line(answer(0), token, "127.0.0.1")
    with pytest.raises(PathFailed, match="EOFError|closed|reset"):
        DirectPath([line.address], DirectPath.new_token(), timeout_s=5).evaluate(np.ones((1, 2)), 0, True)
    stranger = socket.create_connection(line.address)  # a request with no token at all
    stranger.sendall(b"\0" * 64)
    stranger.settimeout(5)
    try:
        assert stranger.recv(1) == b""  # closed, nothing answered
    except ConnectionResetError:
        pass  # closed with its bytes unread: the same refusal
    ok = DirectPath([line.address], token, timeout_s=5).evaluate(np.ones((1, 2)), 0, True)
    assert ok[0][1].shape == (1, 2)


def test_a_failing_worker_is_named_and_the_line_keeps_serving():
    def fails_at_two(points, step, with_logp):
        if step == 2:
            raise FloatingPointError("the shard's term is not finite")
        return answer(0)(points, step, with_logp)

    token = DirectPath.new_token()
    lines = [Line(answer(0), token, "127.0.0.1"), Line(fails_at_two, token, "127.0.0.1")]
    path = DirectPath([line.address for line in lines], token, timeout_s=5)
    with pytest.raises(PathFailed, match="worker 1 failed at step 2: FloatingPointError: the shard's term"):
        path.evaluate(np.ones((2, 2)), 2, True)
    assert len(path.evaluate(np.ones((2, 2)), 3, True)) == 2


def test_a_hung_or_vanished_worker_ends_the_step_within_the_timeout():
    def hangs(points, step, with_logp):
        time.sleep(30)

    token = DirectPath.new_token()
    hung = Line(hangs, token, "127.0.0.1")
    path = DirectPath([hung.address], token, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(PathFailed, match="timed out"):
        path.evaluate(np.ones((1, 2)), 0, True)
    assert time.monotonic() - t0 < 5
    gone = Line(answer(0), token, "127.0.0.1")
    address = gone.address
    gone.close()
    with pytest.raises(PathFailed, match="could not connect to a worker"):
        DirectPath([address], token, timeout_s=2)
