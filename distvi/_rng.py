"""Counter-addressed random streams.

Every random number distvi draws is addressed by (run seed, stream id, position):
a stream can be re-positioned at any point in O(log n), so a retried worker step
or a resumed run draws exactly what the original would have, without carrying a
generator object around.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtri

from distvi._validate import is_int

DRIVER_STREAM = 0
# workers use stream rank + 1; initial particle jitter has its own stream
INIT_STREAM = 2**31
# the draws of start='map' (the ELBO estimates along the L-BFGS path, particles)
PATHFINDER_STREAM = 2**31 + 1


def fresh_seed() -> int:
    """A new run seed from OS entropy (recorded by the caller so the run can be repeated)."""
    return int(np.random.SeedSequence().entropy % (2**63))


def check_seed(random_seed: int | None) -> int:
    """Validate a user seed, or draw a fresh one when it is ``None``."""
    if random_seed is None:
        return fresh_seed()
    if not is_int(random_seed):
        raise TypeError(f"random_seed must be an int or None, got {type(random_seed).__name__}")
    if random_seed < 0:
        raise ValueError(f"random_seed must be >= 0, got {random_seed}")
    return int(random_seed)


class Stream:
    """Uniform and standard-normal draws at explicit positions of one PCG64 stream.

    Each double consumes exactly one 64-bit output, so position ``p`` is always
    reached by ``advance(p)`` from the stream's start.
    """

    def __init__(self, seed: int, stream_id: int) -> None:
        self._seed_seq = np.random.SeedSequence(seed, spawn_key=(stream_id,))
        self._start_state = np.random.PCG64(self._seed_seq).state
        self._bitgen = np.random.PCG64(self._seed_seq)
        self._gen = np.random.Generator(self._bitgen)
        self._position = 0

    def uniform(self, n: int, position: int) -> np.ndarray:
        """``n`` uniforms on [0, 1) starting at ``position`` of the stream."""
        position = int(position)  # PCG64.advance overflows on a numpy integer
        if position != self._position:
            self._bitgen.state = self._start_state
            self._bitgen.advance(position)
        out = self._gen.random(n)
        self._position = position + n
        return out

    def normal(self, shape: tuple[int, ...], position: int) -> np.ndarray:
        """Standard normals (inverse-CDF of the uniforms, so consumption is exact)."""
        n = math.prod(shape)
        u = self.uniform(n, position)
        # random() can return exactly 0.0; ndtri(0) = -inf
        np.maximum(u, 2.0**-60, out=u)
        return ndtri(u).reshape(shape)

    def integers(self, high: int, n: int, position: int) -> np.ndarray:
        """``n`` integers uniform on [0, high) starting at ``position``."""
        u = self.uniform(n, position)
        idx = (u * high).astype(np.intp)
        np.minimum(idx, high - 1, out=idx)
        return idx
