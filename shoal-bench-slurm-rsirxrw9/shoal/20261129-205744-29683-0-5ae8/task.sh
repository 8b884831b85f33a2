#!/bin/bash
# Written by shoal: runs one array task's chunks.
set -e
exec /work/wt-slurm/.venv/bin/python -m shoal.backends._slurm_task "$1"
