#!/usr/bin/env bash
# Stop the cluster that slurm/start-local-cluster.sh STATE_DIR started: cancel its jobs, then end each
# daemon by the PID recorded in STATE_DIR/pids/ (TERM, then KILL after a deadline). A PID is signalled only
# when its environment still holds this STATE_DIR's SLURM_CONF, so a recycled PID is never hit. Idempotent: a stopped
# cluster (or a STATE_DIR that never held one) is fine. STATE_DIR itself is kept (database, logs);
# remove it yourself for a clean slate.
set -uo pipefail

log() { echo "stop-local-cluster: $*" >&2; }
[[ $# -eq 1 ]] || { log "usage: $0 STATE_DIR"; exit 1; }
[[ -d $1 ]] || { log "no state dir '$1': nothing to stop"; exit 0; }
S=$(cd "$1" && pwd -P)
export SLURM_CONF="$S/slurm.conf"

ours() {  # ours NAME -> prints the PID when the recorded process is alive and ours
  local f="$S/pids/$1.pid" pid
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ -r /proc/$pid/environ ]] && tr '\0' '\n' <"/proc/$pid/environ" | grep -qxF "SLURM_CONF=$S/slurm.conf" && echo "$pid"
}

running() {  # running PID: exists and is not a zombie (daemons are reparented; their reaper may be slow)
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

# Jobs first, through SLURM itself: slurmstepd processes outlive slurmd, and scancel ends them cleanly.
if pid=$(ours slurmctld) && [[ -f $SLURM_CONF ]]; then
  timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
  end=$(( $(date +%s) + 15 ))
  while [[ -n $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && (( $(date +%s) < end )); do sleep 0.2; done
fi

# Reverse start order: clients of a daemon go before it.
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pid=$(ours "$name") || { rm -f "$S/pids/$name.pid"; continue; }
  kill -TERM "$pid" 2>/dev/null
  end=$(( $(date +%s) + 15 ))
  while running "$pid" && (( $(date +%s) < end )); do sleep 0.05; done
  if running "$pid"; then
    log "$name ($pid) ignored TERM for 15s; killing"
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$S/pids/$name.pid"
  log "stopped $name ($pid)"
done
exit 0
