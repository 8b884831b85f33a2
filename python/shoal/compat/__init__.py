"""Drop-in adapters for code written for other parallel tools.

Each submodule imports its tool only when it is imported itself, so ``import shoal`` never
needs any of them:

- :mod:`shoal.compat.sciris`: ``parallelize``, with the signature of ``sciris.parallelize``.
- :mod:`shoal.compat.scinexus`: ``ShoalParallel``, a scinexus parallel backend.
- :mod:`shoal.compat.joblib`: ``register()``, which makes ``backend="shoal"`` a joblib backend.
"""

from __future__ import annotations

__all__: list[str] = []
