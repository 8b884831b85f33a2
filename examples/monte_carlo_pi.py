"""Estimate pi with independent Monte Carlo batches, one seed per batch.

Run: python examples/monte_carlo_pi.py
"""

from __future__ import annotations

import random

import shoal


def hits(seed: int, samples: int = 100_000) -> int:
    rng = random.Random(seed)
    return sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


if __name__ == "__main__":
    batches = 32
    inside = shoal.map(hits, range(batches), kwargs={"samples": 100_000})
    print(f"pi ~ {4 * sum(inside) / (batches * 100_000):.5f}")
