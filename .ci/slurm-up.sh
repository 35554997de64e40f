#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the runner's SLURM test (tests/test_runner_slurm.py):
# installs Debian's slurm-wlm and munge when missing (needs root and apt), writes the config,
# starts munged, slurmctld and slurmd unless running, and waits for the node to be idle.
# Idempotent: running it again on a running cluster changes nothing.
# Settings that matter here (Debian 12, root, no systemd, slurm 22.05): cgroup/v1 (22.05 has no
# CgroupPlugin=disabled), proctrack/linuxproc and task/none (no cgroup tracking), munged first.
set -euo pipefail
if ! command -v slurmctld >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm-up: slurm-wlm is not installed and this is not a root Debian machine; skipping" >&2
    exit 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix|alloc"; then
  exit 0  # already up
fi
host=$(hostname -s); cpus=$(nproc); mem=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown munge:munge /etc/munge/munge.key /run/munge
chmod 400 /etc/munge/munge.key
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
printf "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n" > /etc/slurm/cgroup.conf
pgrep -x munged >/dev/null || /usr/sbin/munged --force
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 30); do
  sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix|alloc" && break
  sleep 1
done
sinfo
