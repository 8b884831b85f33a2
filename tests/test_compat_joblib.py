"""The "shoal" joblib backend: joblib.Parallel and scikit-learn's n_jobs= run on shoal."""

from __future__ import annotations

import os

import pytest

import shoal

from compat_helpers import CustomError, RecordingClassifier, die_on, raise_custom_on, where

joblib = pytest.importorskip("joblib")
shoal_joblib = pytest.importorskip("shoal.compat.joblib")


@pytest.fixture(autouse=True, scope="module")
def registered():
    shoal_joblib.register()
    shoal_joblib.register()  # idempotent
    yield
    shoal_joblib.shutdown()


def test_parallel_runs_in_shoal_workers_in_order():
    with joblib.parallel_config(backend="shoal", n_jobs=2):
        runs = joblib.Parallel()(joblib.delayed(where)(x) for x in range(30))
    assert [x for x, _, _ in runs] == list(range(30))
    assert all(pid != os.getpid() and in_worker for _, pid, in_worker in runs)
    assert len({pid for _, pid, _ in runs}) <= 2


def test_generators_and_lambdas():
    with joblib.parallel_config(backend="shoal", n_jobs=2):
        gen = joblib.Parallel(return_as="generator")(joblib.delayed(abs)(-x) for x in range(5))
        assert not isinstance(gen, list)
        assert list(gen) == [0, 1, 2, 3, 4]
        unordered = joblib.Parallel(return_as="generator_unordered")(
            joblib.delayed(lambda x: x * 3)(x) for x in range(5)
        )
        assert sorted(unordered) == [0, 3, 6, 9, 12]


def test_errors_keep_their_type_and_the_backend_stays_usable():
    with joblib.parallel_config(backend="shoal", n_jobs=2):
        with pytest.raises(CustomError, match="bad input 2"):
            joblib.Parallel()(joblib.delayed(raise_custom_on)(x) for x in range(6))
        assert joblib.Parallel()(joblib.delayed(abs)(-x) for x in range(3)) == [0, 1, 2]


def test_a_dead_worker_fails_the_call_and_the_next_call_works():
    with joblib.parallel_config(backend="shoal", n_jobs=2):
        with pytest.raises(shoal.WorkerCrashedError):
            joblib.Parallel(batch_size=1)(joblib.delayed(die_on)(x) for x in range(4))
        assert joblib.Parallel()(joblib.delayed(abs)(-x) for x in range(3)) == [0, 1, 2]


def test_n_jobs_rules():
    backend = shoal_joblib.ShoalBackend()
    assert backend.effective_n_jobs(-1) == shoal.cpu_count()
    assert backend.effective_n_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)


def test_shared_memory_calls_fall_back_to_threads_as_joblib_does():
    with joblib.parallel_config(backend="shoal", n_jobs=2):
        runs = joblib.Parallel(require="sharedmem")(joblib.delayed(where)(x) for x in range(2))
    assert {pid for _, pid, _ in runs} == {os.getpid()}


def test_grid_search_runs_on_shoal(tmp_path):
    pytest.importorskip("sklearn")
    import numpy as np
    from sklearn.model_selection import GridSearchCV

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 3)), np.repeat([0, 1], 30)
    search = GridSearchCV(
        RecordingClassifier(log=str(tmp_path)), {"C": [0.1, 1.0, 10.0]}, cv=3, n_jobs=2
    )
    with joblib.parallel_config(backend="shoal"):
        search.fit(x, y)
    assert search.best_params_["C"] in (0.1, 1.0, 10.0)
    fits = [name.split("-") for name in os.listdir(tmp_path)]
    # 3 candidates x 3 folds in workers, then one refit in this process.
    in_workers = [pid for pid, shoal_worker, _ in fits if shoal_worker == "True"]
    assert len(in_workers) == 9
    assert str(os.getpid()) not in in_workers
    assert [pid for pid, shoal_worker, _ in fits if shoal_worker == "False"] == [str(os.getpid())]
