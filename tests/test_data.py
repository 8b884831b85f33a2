"""Issue 4 features that stand on their own: thread limits, seeds, worker state."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shoal
from shoal.backends.processes import THREAD_VARIABLES, ProcessBackend

from helpers import square


def worker_env(_):
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}


def test_workers_get_thread_limits_by_default():
    be = ProcessBackend(workers=2)
    try:
        (env,) = shoal.map(worker_env, [0], backend=be)
    finally:
        be.shutdown()
    expected = str(max(1, shoal.cpu_count() // 2))
    for name in THREAD_VARIABLES:
        if name not in os.environ:
            assert env[name] == expected, (name, env)


def test_threads_per_worker_option_and_user_setting_wins():
    code = (
        "import shoal, test_data\n"
        "ex = shoal.Executor(workers=1, threads_per_worker=3)\n"
        "print(ex.submit(test_data.worker_env, 0).result())\n"
        "ex.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update({"PYTHONPATH": os.pathsep.join(sys.path), "MKL_NUM_THREADS": "7"})
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    got = eval(out.stdout)
    assert got["OMP_NUM_THREADS"] == "3" and got["OPENBLAS_NUM_THREADS"] == "3"
    assert got["MKL_NUM_THREADS"] == "7", "the user's explicit setting wins"


def test_bad_threads_per_worker():
    with pytest.raises(ValueError):
        ProcessBackend(threads_per_worker=0)
    with pytest.raises(TypeError):
        ProcessBackend(threads_per_worker="2")
    assert shoal.map(square, [2]) == [4]
