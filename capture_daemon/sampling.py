"""Packet sampling, decided per batch before any per-packet work.

``everyN:N`` keeps exactly every N-th packet (the N-th, 2N-th, ... counted over the whole
capture, across batches); ``uniform:P[:SEED]`` keeps each packet independently with
probability P (a seed makes runs reproducible); ``none`` keeps everything.
"""

from __future__ import annotations

import numpy as np


class SamplingError(ValueError):
    pass


class Sampler:
    kind = "none"

    def select(self, n: int) -> np.ndarray | None:
        """Indices of the packets to keep out of the next n, or None for all of them."""
        return None

    def describe(self) -> dict:
        return {"type": self.kind}

    def for_worker(self, index: int, workers: int) -> "Sampler":
        """The sampler one of several fan-out workers runs on its share of the packets."""
        return self


class EveryN(Sampler):
    kind = "everyN"

    def __init__(self, n: int):
        if n < 1:
            raise SamplingError("everyN needs N >= 1")
        self.n = n
        self.seen = 0

    def select(self, n: int):
        if self.n == 1:
            self.seen += n
            return None
        # Global 1-based packet numbers divisible by N, shifted to this batch's indices.
        first = (-self.seen - 1) % self.n
        idx = np.arange(first, n, self.n, dtype=np.int64)
        self.seen += n
        return idx

    def describe(self):
        d = {"type": self.kind, "n": self.n}
        if getattr(self, "per_worker", False):
            # Each fan-out worker counts its own packets: every N-th of its share, so the
            # union is 1 in N on average but not exactly every N-th packet of the wire.
            d["exact"] = False
            d["scope"] = "per fan-out worker"
        return d

    def for_worker(self, index, workers):
        if workers <= 1:
            return self
        s = EveryN(self.n)
        s.per_worker = True
        return s


class Uniform(Sampler):
    kind = "uniformrandom"

    def __init__(self, p: float, seed: int | None = None):
        if not 0.0 < p <= 1.0:
            raise SamplingError("uniform needs 0 < P <= 1")
        self.p = p
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def select(self, n: int):
        return np.nonzero(self.rng.random(n) < self.p)[0]

    def describe(self):
        d = {"type": self.kind, "p": self.p, "seed": self.seed}
        if getattr(self, "worker_seed", None) is not None:
            d["worker_seed"] = self.worker_seed
        return d

    def for_worker(self, index, workers):
        if workers <= 1:
            return self
        s = Uniform(self.p, self.seed)
        if self.seed is not None:
            # A different, reproducible stream per worker: the same seed everywhere would
            # make the workers' choices correlated (the same positions in each share).
            s.worker_seed = [self.seed, index]
            s.rng = np.random.default_rng(s.worker_seed)
        return s


def parse_sample_spec(spec: str | None) -> Sampler:
    """``none`` | ``everyN:N`` | ``uniform:P[:SEED]`` (the command line's spelling)."""
    if spec is None or spec in ("", "none"):
        return Sampler()
    kind, _, rest = spec.partition(":")
    try:
        if kind.lower() == "everyn":
            return EveryN(int(rest))
        if kind.lower() in ("uniform", "uniformrandom"):
            p, _, seed = rest.partition(":")
            return Uniform(float(p), int(seed) if seed else None)
    except ValueError as exc:
        if isinstance(exc, SamplingError):
            raise
        raise SamplingError(f"bad sampling spec {spec!r}: {exc}") from None
    raise SamplingError(f"bad sampling spec {spec!r}: use none, everyN:N or uniform:P[:SEED]")
