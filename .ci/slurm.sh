#!/usr/bin/env bash
# A real one-node Slurm for the tests (Debian packages: slurmctld, slurmd, slurm-client, munge).
#   .ci/slurm.sh install   apt-get the packages (root; ~10 s)
#   .ci/slurm.sh start     write slurm.conf for this machine, start munged, slurmctld, slurmd; wait for idle
#   .ci/slurm.sh stop      stop the daemons by their pid files
#   .ci/slurm.sh env       print `export SLURM_CONF=...` (clients need it)
# State, logs and pid files live under $DECM_SLURM_DIR (default /tmp/decm-slurm).
# cred_expire=10: a requeued job may restart after 10 s instead of Slurm's default 120 s (preemption test);
# sched_interval/bf_interval=1: a job that became eligible starts within a second instead of waiting up to
# 30-60 s for the next scheduling pass (each requeue in the preemption tests waited 20-40 s for it).
set -euo pipefail
DIR="${DECM_SLURM_DIR:-/tmp/decm-slurm}"
CONF="$DIR/slurm.conf"

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat >"$CONF" <<CONF
ClusterName=decm-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start() {
  install
  write_conf
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  if ! pgrep -x munged >/dev/null; then runuser -u munge -- /usr/sbin/munged; fi
  export SLURM_CONF="$CONF"
  stop_daemons quiet
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "slurm: one node idle ($(nproc) CPUs); export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm: node not idle after 30 s" >&2
  sinfo >&2 || true
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  return 1
}

stop_daemons() {
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    if [ -s "$pidfile" ]; then
      local pid
      pid="$(cat "$pidfile")"
      if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      fi
      rm -f "$pidfile"
    fi
  done
  if [ "${1:-}" != quiet ] && [ -s /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  fi
  [ "${1:-}" = quiet ] || echo "slurm: stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_daemons ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
