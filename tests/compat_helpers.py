"""Functions, apps and estimators for the compat tests, importable by reference in workers.

No ``from __future__ import annotations`` here: scinexus apps refuse string type hints.
"""

import os

import numpy as np


def in_shoal_worker() -> bool:
    """Whether this process is one of shoal's worker processes."""
    with open("/proc/self/cmdline", "rb") as f:
        return b"shoal._worker" in f.read()


def where(x):
    """``(x, pid, whether a shoal worker ran it)``."""
    return x, os.getpid(), in_shoal_worker()


def die_on(x, bad=1):
    """Kill the worker process running input ``bad``."""
    if x == bad:
        os._exit(3)
    return x


class CustomError(Exception):
    """An exception type the caller must get back as itself."""


def raise_custom_on(x, bad=2):
    if x == bad:
        raise CustomError(f"bad input {x}")
    return x


def record_call(data):
    """A sciris callback: log the job's index and the pid running the callback."""
    with open(os.path.join(data["kwargs"]["log"], f"{data['index']}"), "w") as f:
        f.write(f"{os.getpid()}")


def stop_on_failure(data):
    data["stop"] = not data["outdict"]["success"]


try:
    from scinexus.composable import define_app
except ImportError:  # scinexus is optional; its tests skip without it
    pass
else:

    @define_app
    def crash_on_three(val: int) -> int:
        """A scinexus app whose worker dies on input 3 and that fails on input 5."""
        if val == 3:
            os._exit(7)
        if val == 5:
            raise ValueError("five")
        return val * 10


try:
    from sklearn.base import BaseEstimator, ClassifierMixin
except ImportError:  # scikit-learn is optional; its tests skip without it
    pass
else:

    class RecordingClassifier(ClassifierMixin, BaseEstimator):
        """Predicts the majority class; each fit logs the process that ran it."""

        def __init__(self, C=1.0, log=None):  # noqa: N803 - scikit-learn's names
            self.C = C
            self.log = log

        def fit(self, X, y):  # noqa: N803
            if self.log is not None:
                name = f"{os.getpid()}-{in_shoal_worker()}-{np.random.randint(1 << 30)}"
                open(os.path.join(self.log, name), "w").close()
            self.classes_, counts = np.unique(y, return_counts=True)
            self.majority_ = self.classes_[np.argmax(counts)]
            return self

        def predict(self, X):  # noqa: N803
            return np.full(len(X), self.majority_)
