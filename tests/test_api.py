"""Backend selection, CPU counting and the plug-in contract."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shoal
from shoal.backends.threads import ThreadBackend

from helpers import square


def test_cpu_count_is_positive_and_within_the_machine():
    n = shoal.cpu_count()
    assert 1 <= n <= (os.cpu_count() or n)
    assert n == len(os.sched_getaffinity(0)) or n < len(os.sched_getaffinity(0))


def _cpu_count_in_child(env=None, affinity=None):
    code = "import os, shoal\n"
    if affinity is not None:
        code += f"os.sched_setaffinity(0, {affinity!r})\n"
    code += "print(shoal.cpu_count())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_cpu_count_honours_affinity():
    assert _cpu_count_in_child(affinity={0}) == 1


def test_cpu_count_honours_slurm():
    assert _cpu_count_in_child(env={"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert _cpu_count_in_child(env={"SLURM_CPUS_ON_NODE": "1"}) == 1


def test_workers_none_means_all_usable_cpus():
    assert shoal.get_backend("threads").pool().workers == shoal.cpu_count()


def test_unknown_backend_and_option():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*processes"):
        shoal.map(square, [1], backend="gpu")
    with pytest.raises(TypeError):
        shoal.get_backend("threads", bogus=1)
    with pytest.raises(TypeError):
        shoal.map(square, [1], backend=3.5)


def test_set_backend_and_context_manager():
    old = shoal.get_backend()
    try:
        shoal.set_backend("threads", workers=2)
        assert shoal.get_backend().name == "threads"
        with shoal.backend("serial") as be:
            assert shoal.get_backend() is be
            assert shoal.map(square, [2]) == [4]
        assert shoal.get_backend().name == "threads"
    finally:
        shoal.set_backend(old)
    assert shoal.get_backend() is old


def test_get_backend_does_not_change_default():
    before = shoal.get_backend()
    other = shoal.get_backend("serial")
    assert other.name == "serial"
    assert shoal.get_backend() is before


def test_available_backends():
    assert {"processes", "threads", "serial"} <= set(shoal.available_backends())


def test_a_user_backend_plugs_in():
    """A custom engine: subclass Backend; here it reuses the thread pool and counts chunks."""
    submitted = []

    class Counting(ThreadBackend):
        name = "counting"

        def create_pool(self, workers):
            pool = super().create_pool(workers)
            real_open = pool.open_session

            def open_session(*, ordered, limits=None):
                session = real_open(ordered=ordered, limits=limits)
                real_submit = session.submit

                def submit(spec_id, items, start, exclusive=False):
                    submitted.append(len(items))
                    return real_submit(spec_id, items, start, exclusive)

                session.submit = submit
                return session

            pool.open_session = open_session
            return pool

    shoal.register_backend("counting", Counting)
    assert shoal.map(square, range(100), backend="counting", chunksize=10) == [
        x * x for x in range(100)
    ]
    assert sum(submitted) == 100 and len(submitted) == 10
    with pytest.raises(TypeError):
        shoal.register_backend("nope", object)
