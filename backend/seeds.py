"""Seeds of a batch: image i of a batch drawn with seed S is the image seed S + i gives alone.

As A1111 does, every batch item has its own seed (S, S + 1, ...; modulo 2^64) and its own random generator, which
draws that item's starting noise and the noise an ancestral or LCM scheduler adds at each step. So any image of
a grid is reproduced by its own seed with a batch of one, and a batch of one draws exactly what one generator
seeded with S always drew (the same images as before batches had per-item seeds).
"""
from __future__ import annotations

import numpy as np

SEED_LIMIT = 2**64


def item_seed(seed: int, index: int) -> int:
    """The seed of batch item `index` (0-based) of a batch drawn with `seed`."""
    return (int(seed) + index) % SEED_LIMIT


class BatchNoise:
    """A random generator per batch item, used where the pipeline wants one `standard_normal(shape)`: a shape whose
    first axis is the batch is filled item by item, each from its own generator; any other shape (not one the
    pipeline asks for) comes from the first item's generator."""

    def __init__(self, seed: int, batch_size: int = 1):
        self.seeds = [item_seed(seed, i) for i in range(max(1, int(batch_size)))]
        self.generators = [np.random.default_rng(s) for s in self.seeds]

    def standard_normal(self, shape, dtype=np.float64) -> np.ndarray:
        shape = tuple(shape)
        if len(self.generators) == 1 or not shape or shape[0] != len(self.generators):
            return self.generators[0].standard_normal(shape, dtype=dtype)
        return np.stack([g.standard_normal(shape[1:], dtype=dtype) for g in self.generators])
