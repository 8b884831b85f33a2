"""``shoal info``: what shoal sees on this machine."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys


def _cgroup_quota() -> str:
    """The cgroup CPU quota as ``"1.5"`` CPUs, or ``"none"``."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return f"{int(quota) / int(period):g}"
        return "none"
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        if quota_us > 0:
            return f"{quota_us / period_us:g}"
    except (OSError, ValueError):
        pass
    return "none"


def cpu_explanation() -> str:
    """``"2 (affinity 2, cgroup quota none, Slurm none)"``."""
    import shoal

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    return (
        f"{shoal.cpu_count()} (affinity {affinity}, cgroup quota {_cgroup_quota()}, "
        f"Slurm {slurm or 'none'})"
    )


def _mpi() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        runner = shutil.which("mpiexec") or shutil.which("mpirun")
        return f"mpi4py not installed{f' (launcher {runner})' if runner else ''}"
    try:
        from mpi4py import MPI

        return str(MPI.Get_library_version()).splitlines()[0].strip()
    except Exception as exc:
        return f"mpi4py installed, MPI library not usable: {exc}"


def _slurm() -> str:
    sbatch = shutil.which("sbatch")
    job = os.environ.get("SLURM_JOB_ID")
    parts = [f"sbatch at {sbatch}" if sbatch else "no sbatch on PATH"]
    if job:
        parts.append(f"inside job {job}")
    return ", ".join(parts)


def info_lines() -> list[str]:
    """The lines ``shoal info`` prints."""
    import shoal

    lines = [
        f"shoal {shoal.__version__} (Python {sys.version.split()[0]}, {sys.executable})",
        f"CPUs: {cpu_explanation()}",
        "backends:",
    ]
    for name in shoal.available_backends():
        try:
            shoal.get_backend(name)
            state = "built in, available"
        except Exception as exc:
            state = f"not usable: {exc}"
        lines.append(f"  {name}: {state}")
    lines.append(f"MPI: {_mpi()}")
    lines.append(f"Slurm: {_slurm()}")
    return lines
