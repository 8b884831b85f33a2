"""Names that the examples in README.md and docs/ use without defining them.

The root ``conftest.py`` runs this file in a module made at run time and hands its public
names to every example block. Everything is small, so that all the examples run in seconds.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

import shoal


def simulate(beta: float, steps: int = 1_000) -> float:
    """A toy Monte Carlo run: the fraction of ``steps`` random draws below ``beta``."""
    rng = random.Random(beta)
    return sum(rng.random() < beta for _ in range(steps)) / steps


betas = [0.1, 0.2, 0.5, 0.9]
params = [i / 10 for i in range(10)]
xs = list(range(8))

#: A matrix big enough (2 MiB) to go through shared memory, and small datasets to fit to it.
big_matrix = np.arange(512 * 512, dtype=np.float64).reshape(512, 512) / 512**2
datasets = [np.full(512, float(i)) for i in range(6)]
batches = [datasets[:3], datasets[3:]]


def fit(data: np.ndarray, matrix: np.ndarray) -> float:
    """A stand-in for a model fit: one matrix-vector product, reduced to a number."""
    return float((matrix @ data).sum())


path = "model.bin"
paths = [f"data/run-{i}.csv" for i in range(4)]


def process(path: str) -> int:
    """A stand-in for reading and reducing one input file: the length of its name."""
    return len(path)


lookup_table = {i: i * i for i in range(100)}


def load_model(path: str) -> None:
    """An initializer: loads an expensive object once per worker into its state."""
    shoal.worker_state()["model"] = {"path": path, "scale": 2}


def task(x: int) -> int:
    """A task that reads what the initializer loaded, and the call's shared object."""
    model = shoal.worker_state()["model"]
    return int(model["scale"] * shoal.shared()[x])


def job(x: int) -> int:
    return x * x


systems = [(np.eye(4) * (i + 1), np.ones(4)) for i in range(4)]


def solve(system: tuple[np.ndarray, np.ndarray]) -> Any:
    a, b = system
    return np.linalg.solve(a, b)
