"""Reproducible randomness: one independent random stream per item.

With ``seed=``, each item's stream is derived from the seed and the item's *input index*, and
installed as the global state of :mod:`random` and of numpy's legacy global generator
(``np.random.*``) just before the item runs. The result of an item therefore depends only on
the seed and its index: not on the number of workers, the chunking, the backend, the order of
completion, or retries.

- :mod:`random` gets a 128-bit seed from BLAKE2b over ``(seed, index)``;
- numpy gets ``SeedSequence(seed, spawn_key=(index,))``, the way numpy itself spawns
  independent child streams.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def item_seed(seed: int, index: int) -> int:
    """The 128-bit seed of item ``index`` for :mod:`random`."""
    digest = hashlib.blake2b(f"shoal:{seed}:{index}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


class Seeder:
    """Installs the stream of an item before it runs (numpy is looked up once)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.np = _numpy()

    def install(self, index: int) -> None:
        random.seed(item_seed(self.seed, index))
        np = self.np
        if np is not None:
            sequence = np.random.SeedSequence(self.seed, spawn_key=(index,))
            np.random.seed(sequence.generate_state(4))
