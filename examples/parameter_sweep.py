"""A parameter sweep that survives bad points: failures are returned in place, named.

Run: python examples/parameter_sweep.py
"""

from __future__ import annotations

import math

import shoal


def simulate(beta: float, steps: int = 10_000) -> float:
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    x = 0.0
    for i in range(steps):
        x += math.exp(-beta * i / steps)
    return x / steps


if __name__ == "__main__":
    betas = [-1.0, 0.5, 1.0, 2.0, 4.0]
    results = shoal.map(simulate, betas, kwargs={"steps": 50_000}, on_error="return")
    for beta, result in zip(betas, results, strict=True):
        if isinstance(result, Exception):
            print(f"beta={beta:5}: failed: {result!r} ({result.__notes__[0]})")
        else:
            print(f"beta={beta:5}: {result:.6f}")
    # As results complete, with the index of the input each belongs to:
    for i, r in shoal.as_completed(simulate, betas[1:], with_index=True):
        print(f"done: beta={betas[1 + i]} -> {r:.4f}")
