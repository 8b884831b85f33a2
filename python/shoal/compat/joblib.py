"""A joblib backend named ``"shoal"``.

    import joblib
    import shoal.compat.joblib

    shoal.compat.joblib.register()
    with joblib.parallel_config(backend="shoal", n_jobs=4):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

Everything that goes through joblib (scikit-learn's ``n_jobs=``, for one) then runs on shoal.
Data flow: joblib groups calls into batches (auto-batching, as with its own process backend)
and hands each batch to :meth:`ShoalBackend.submit`, which submits it to a
:class:`shoal.Executor` owned by the backend for the length of one ``Parallel`` call; joblib
collects the futures' results, in order or as a generator. A batch that raises comes back with
its own exception type; a worker that dies fails its batch with
:class:`shoal.WorkerCrashedError`, and the executor goes on with new workers.

joblib has no entry point for backends, so :func:`register` must be called once per process
(it is idempotent).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

import shoal

__all__ = ["ShoalBackend", "register", "shutdown"]

_JOBLIB_POOL_OPTIONS = frozenset({"max_nbytes", "mmap_mode", "temp_folder", "context", "verbose"})


class ShoalBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``ParallelBackendBase`` on a :class:`shoal.Executor`.

    Parameters
    ----------
    **shoal_options
        Options of :class:`shoal.Executor` (``backend=``, ``timeout=``, ``retries=``,
        ``max_worker_memory=``...), given as ``joblib.parallel_config(backend="shoal",
        timeout=...)`` or ``ShoalBackend(timeout=...)``.
    """

    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False  # so joblib runs require="sharedmem" calls on threads itself
    uses_threads = False
    default_n_jobs = -1

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **shoal_options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self.shoal_options = shoal_options
        self._executor: shoal.Executor | None = None
        #: Batches submitted through this backend, all calls together (tests check it).
        self.submitted = 0

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """joblib's rule: ``-1`` is all CPUs, ``-2`` all but one, and so on."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max(shoal.cpu_count() + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        """Start the executor for one ``Parallel`` call; return its number of workers."""
        n = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        # joblib's memmapping pool options (max_nbytes, mmap_mode, temp_folder, context,
        # verbose) have no meaning here: shoal sends arguments by pickle, arrays included.
        options = {
            **self.shoal_options,
            **{k: v for k, v in backend_kwargs.items() if k not in _JOBLIB_POOL_OPTIONS},
        }
        if self.inner_max_num_threads is not None:
            options.setdefault("threads_per_worker", self.inner_max_num_threads)
        self._executor = _executor(n, options)
        return n

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None) -> Any:
        """Run one batch (a no-argument callable) on a worker."""
        if self._executor is None:
            raise RuntimeError("the shoal joblib backend was used before configure()")
        self.submitted += 1
        future = self._executor.submit(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or its exception raised with its own type."""
        return out.result()

    def terminate(self) -> None:
        """End of a ``Parallel`` call: the workers stay up for the next call (as loky's do)."""
        self._executor = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed: drop what has not started, and let running tasks end."""
        if self._executor is not None:
            _drop(self._executor)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)


#: The executor kept between ``Parallel`` calls, with the settings it was made for. Starting
#: workers (and importing joblib in them) costs a few tenths of a second per call otherwise.
_kept: tuple[Any, shoal.Executor] | None = None
_kept_lock = threading.Lock()


def _executor(n: int, options: dict[str, Any]) -> shoal.Executor:
    global _kept
    key = (n, sorted(options.items(), key=lambda kv: kv[0]))
    with _kept_lock:
        if _kept is not None and _kept[0] == key:
            return _kept[1]
        old, _kept = _kept, (key, shoal.Executor(n, **options))
    if old is not None:
        old[1].shutdown(wait=False)
    return _kept[1]


def _drop(executor: shoal.Executor) -> None:
    global _kept
    with _kept_lock:
        if _kept is not None and _kept[1] is executor:
            _kept = None


def shutdown() -> None:
    """Stop the workers kept for the next ``Parallel`` call (they also end with the process)."""
    global _kept
    with _kept_lock:
        old, _kept = _kept, None
    if old is not None:
        old[1].shutdown(wait=True)


def register(make_default: bool = False) -> None:
    """Register :class:`ShoalBackend` with joblib under the name ``"shoal"``.

    Parameters
    ----------
    make_default : bool
        Also make it joblib's default backend.
    """
    register_parallel_backend("shoal", ShoalBackend, make_default=make_default)
