"""shoal.Executor is a concurrent.futures.Executor: it drops into code that takes one.

Run: python examples/executor_scipy_style.py
"""

from __future__ import annotations

import concurrent.futures as cf

import shoal


def objective(x: float) -> float:
    return (x - 3.0) ** 2


if __name__ == "__main__":
    with shoal.Executor(workers=2) as ex:
        futures = {ex.submit(objective, x / 10): x / 10 for x in range(60)}
        best = min(cf.as_completed(futures), key=lambda f: f.result())
        print(f"best x = {futures[best]} (objective {best.result():.4f})")
        # The map-like callable many libraries accept (e.g. scipy's `workers=`):
        print(list(ex.map(objective, [0.0, 3.0])))
