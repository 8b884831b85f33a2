#!/usr/bin/env bash
# Stop the single-node Slurm started by scripts/slurm_up.sh: slurmctld, slurmd, then munged,
# each by the pid in its pid file (never by name).
set -uo pipefail
DIR=${SHOAL_SLURM_DIR:-/tmp/shoal-slurm}

stop() {  # pid file -> TERM, wait up to 10 s, then KILL
  local file=$1 pid stat
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    stat=$(ps -o stat= -p "$pid" 2>/dev/null || true)
    # Gone, or a zombie waiting for pid 1 to reap it: stopped either way.
    if [ -z "$stat" ] || [ "${stat#Z}" != "$stat" ]; then
      return 0
    fi
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"
stop /run/munge/munged.pid
