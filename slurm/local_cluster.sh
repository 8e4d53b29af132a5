#!/bin/bash
# A real Slurm cluster on this one machine, for tests: Debian's slurm-wlm + munge, daemons started
# directly (no systemd, no cgroups). Needs root (apt, /etc/slurm/slurm.conf).
#
#   slurm/local_cluster.sh start    # install if missing, configure, start, wait until the nodes are idle
#   slurm/local_cluster.sh status   # daemons this script started + sinfo
#   slurm/local_cluster.sh stop     # cancel the jobs, end the daemons it started (by PID)
#
# Environment:
#   LOCAL_SLURM_NODES  nodes to emulate (default 2): one slurmd per node on its own port, all on
#                      127.0.0.1; each node offers all CPUs (nproc) and 90% of MemTotal, so a
#                      2-node job shares this machine's cores
#   LOCAL_SLURM_DIR    state, spool, logs and PID files (default /var/tmp/megatron_tip_slurm)
# Partition "debug" (default) holds all nodes. AuthInfo=cred_expire=5 lets a requeued job start
# again after ~10 s (Slurm's default holds it ~120 s).
set -euo pipefail

NODES=${LOCAL_SLURM_NODES:-2}
DIR=${LOCAL_SLURM_DIR:-/var/tmp/megatron_tip_slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by megatron_tip slurm/local_cluster.sh"
STARTED="$DIR/started"   # one line per daemon this script started: "<name> <pid file>"

die() { echo "local_cluster: $*" >&2; exit 1; }
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then return; fi
  [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are missing and installing them needs root"
  echo "local_cluster: installing slurm-wlm munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  local pkgs=(slurm-wlm munge)
  mkdir -p "$DIR"
  local log="$DIR/apt.log"
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" > "$log" 2>&1 \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >> "$log" 2>&1 \
    || { tail -n 20 "$log" >&2; die "apt-get install ${pkgs[*]} failed (log: $log)"; }
}

write_conf() {
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace it"
  fi
  local cpus mem host node port=6818
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys OMP_NUM_THREADS (CI sets 1)
  mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  host=$(hostname -s)
  mkdir -p "$DIR/state" "$(dirname "$CONF")"
  {
    echo "$MARK"
    cat <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobRequeue=1
ReturnToService=2
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EOF
    for node in $(node_names); do
      echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem State=UNKNOWN"
      port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF"
}

started() { echo "$1 $2" >> "$STARTED"; }

start_munge() {
  if munge -n </dev/null >/dev/null 2>&1; then return; fi   # a munged already answers: use it
  [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  started munged /run/munge/munged.pid
  local i
  for ((i = 0; i < 50; i++)); do munge -n </dev/null >/dev/null 2>&1 && return; sleep 0.1; done
  die "munged did not answer (see /var/log/munge/munged.log)"
}

start() {
  install
  mkdir -p "$DIR"
  if ! alive "$DIR/slurmctld.pid"; then write_conf; fi
  start_munge
  if ! alive "$DIR/slurmctld.pid"; then
    slurmctld || die "slurmctld failed to start (see $DIR/slurmctld.log)"
    started slurmctld "$DIR/slurmctld.pid"
  fi
  local node
  for node in $(node_names); do
    if ! alive "$DIR/slurmd-$node.pid"; then
      mkdir -p "$DIR/spool/$node"
      slurmd -N "$node" || die "slurmd -N $node failed to start (see $DIR/slurmd-$node.log)"
      started "slurmd-$node" "$DIR/slurmd-$node.pid"
    fi
  done
  wait_idle
}

wait_idle() {
  local i states
  for ((i = 0; i < 120; i++)); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    if [[ -n $states ]] && ! grep -qv ' idle$' <<< "$states"; then
      echo "local_cluster: $NODES node(s) idle, partition debug"; return
    fi
    # A node left down/drained by an earlier stop comes back once its slurmd answers.
    if grep -qE ' (down|drained)' <<< "$states"; then
      scontrol update NodeName="$(awk '/ (down|drained)/ {print $1}' <<< "$states" | paste -sd,)" \
        State=RESUME 2>/dev/null || true
    fi
    sleep 0.5
  done
  echo "$states" >&2
  die "nodes not idle after 60 s (logs in $DIR)"
}

status() {
  local name pidfile
  if [[ -f $STARTED ]]; then
    while read -r name pidfile; do
      if alive "$pidfile"; then echo "$name running (pid $(cat "$pidfile"))"; else echo "$name not running"; fi
    done < "$STARTED"
  else
    echo "no daemons started by this script"
  fi
  sinfo 2>/dev/null || true
}

stop() {
  [[ -f $STARTED ]] || { echo "local_cluster: nothing to stop"; return; }
  local jobs i name pidfile pids=()
  if alive "$DIR/slurmctld.pid"; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel $jobs || true
      for ((i = 0; i < 60 && $(squeue -h -t all -o %T 2>/dev/null | grep -cvE '^(COMPLETED|CANCELLED|FAILED|TIMEOUT)$' || true) > 0; i++)); do
        sleep 0.5
      done
    fi
  fi
  # slurmd first, then slurmctld, then munged: the reverse of the start order.
  while read -r name pidfile; do
    if alive "$pidfile"; then pids+=("$(cat "$pidfile")"); kill "$(cat "$pidfile")"; echo "local_cluster: stopped $name"; fi
  done < <(tac "$STARTED")
  for ((i = 0; i < 100; i++)); do
    local left=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -9 "$p"; done
  rm -f "$STARTED"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
