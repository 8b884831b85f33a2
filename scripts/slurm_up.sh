#!/usr/bin/env bash
# Install (if missing) and start a single-node Slurm on 127.0.0.1 for shoal's Slurm tests.
#
# Root only (Debian packages, daemons as root); idempotent: when the controller already answers
# `scontrol ping`, it returns at once. No systemd and no cgroups are needed: the node uses
# proctrack/linuxproc and task/none, so Slurm enforces neither memory nor CPU binding here.
# sacct needs slurmdbd, which this does not run: shoal polls squeue and scontrol instead.
#
#   scripts/slurm_up.sh      # start (installs munge and Slurm on first use)
#   scripts/slurm_down.sh    # stop the daemons this started, by pid
#
# Environment: SHOAL_SLURM_DIR (state, spool, logs and pid files; default /tmp/shoal-slurm),
# SHOAL_SLURM_CPUS (CPUs of the node; default: nproc).
set -euo pipefail
DIR=${SHOAL_SLURM_DIR:-/tmp/shoal-slurm}
CPUS=${SHOAL_SLURM_CPUS:-$(nproc)}

controller_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_ready() { sinfo -h -o %t 2>/dev/null | grep -Eqx 'idle|mix|alloc'; }

if command -v scontrol >/dev/null 2>&1 && controller_up && node_ready; then
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "slurm_up.sh: needs root (it installs Debian packages and runs slurmctld/slurmd)" >&2
  exit 1
fi

missing=()
for cmd in munged slurmctld slurmd sbatch; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "slurm_up.sh: installing munge and Slurm (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurmctld slurmd slurm-client \
    >/dev/null
fi

mkdir -p "$DIR"/{state,spool,log} /etc/slurm /run/munge
chown munge:munge /run/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
# munge -n succeeds only when munged answers.
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
fi

alive() {  # pid file -> true if that process lives and is not a zombie
  [ -s "$1" ] || return 1
  local pid stat
  pid=$(cat "$1")
  stat=$(ps -o stat= -p "$pid" 2>/dev/null || true)
  [ -n "$stat" ] && [ "${stat#Z}" = "$stat" ]
}

conf=/etc/slurm/slurm.conf
cat > "$conf.shoal-new" <<CONF
# Written by shoal's scripts/slurm_up.sh: a single node on loopback, for tests.
ClusterName=shoal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
# Listen on the address the host name resolves to (127.0.0.1, see below), not on every
# interface: NoCtldInAddrAny for slurmctld, NoInAddrAny for slurmd, slurmstepd and srun.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=100000,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
MaxArraySize=100001
NodeName=localnode NodeAddr=127.0.0.1 NodeHostname=localnode CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localnode Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
mv "$conf.shoal-new" "$conf"

# With NoInAddrAny, Slurm's daemons bind to the address that gethostname() resolves to, and
# clients reach them at 127.0.0.1 (SlurmctldHost, NodeAddr). Where the host name resolves to
# 127.0.0.1 they run as they are; elsewhere (Debian's 127.0.1.1, or an address in DNS), in a UTS
# namespace of their own whose host name is "localhost", so that they listen on 127.0.0.1 only.
loopback_name() {
  getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { ok = ($1 == "127.0.0.1") } END { exit !ok }'
}
run_daemon() {
  if loopback_name "$(hostname)"; then
    "$@"
  else
    unshare --uts /bin/sh -c 'hostname localhost && exec "$@"' sh "$@"
  fi
}

# -i: start with empty state (no jobs left from an earlier run); both daemonize.
alive "$DIR/slurmctld.pid" || run_daemon slurmctld -i
alive "$DIR/slurmd.pid" || run_daemon slurmd -N localnode

for i in $(seq 1 120); do
  if controller_up && node_ready; then
    exit 0
  fi
  if [ "$i" = 40 ] && controller_up; then
    # A node left DOWN or DRAINED by an earlier run (e.g. slurmd killed mid-job): bring it back.
    scontrol update nodename=localnode state=resume 2>/dev/null || true
  fi
  sleep 0.25
done
echo "slurm_up.sh: Slurm did not come up; logs in $DIR/log" >&2
scontrol ping >&2 || true
sinfo >&2 || true
exit 1
