"""Tasks that take other tasks' futures as arguments, and the graph they make.

Run: python examples/task_graph.py
"""

from __future__ import annotations

import shoal


def load(part: int) -> list[float]:
    return [float(part + i) for i in range(100)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def combine(means: list[float], weights: dict[str, float]) -> float:
    return sum(m * weights["each"] for m in means)


def to_dot(graph: dict[int, list[int]]) -> str:
    """Graphviz DOT text: an edge from each dependency to the task that needs it."""
    lines = ["digraph tasks {"]
    lines += [f'  "{d}" -> "{t}";' for t, deps in graph.items() for d in deps]
    lines += [f'  "{t}";' for t, deps in graph.items() if not deps]
    lines.append("}")
    return "\n".join(lines)


if __name__ == "__main__":
    with shoal.Executor(workers=2) as ex:
        parts = [ex.submit(load, p) for p in range(3)]
        means = [ex.submit(mean, part) for part in parts]  # each waits for its part
        weight = ex.submit(lambda: 0.5)
        total = ex.submit(combine, means, weights={"each": weight})  # waits for all four
        print(f"total = {total.result():.2f}")
        for batch in shoal.batched(means, 2):  # results in pairs, as they complete
            print("batch of means:", sorted(round(m, 2) for m in batch))
        print(to_dot(ex.dependency_graph()))
