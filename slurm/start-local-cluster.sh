#!/usr/bin/env bash
# Start a real single-node SLURM cluster on localhost, for ddkit's tests and for trying `ddkit submit`.
#
#   slurm/start-local-cluster.sh STATE_DIR      (then: export SLURM_CONF=STATE_DIR/slurm.conf,
#                                                or:   source STATE_DIR/env.sh)
#   slurm/stop-local-cluster.sh  STATE_DIR
#
# What runs: munged, MariaDB (accounting store, 127.0.0.1 only), slurmdbd, slurmctld and slurmd, each started
# by hand without systemd and recorded by PID in STATE_DIR/pids/. Every file (configs, keys, database,
# state, spool, sockets, logs) lives under STATE_DIR; daemons listen on loopback ports picked at first start.
# Partitions: `gpu` (default) and `cpu`; the node advertises 2 fake GPUs through GRES (character-device
# symlinks to /dev/null), so `--gpus-per-node 2` is schedulable and jobs see CUDA_VISIBLE_DEVICES=0,1.
#
# Missing packages are installed with apt-get (Debian 12: Slurm 22.05), with a temporary
# /usr/sbin/policy-rc.d so the packages' install scripts start no system-wide daemon.
# Idempotent: when the cluster recorded in STATE_DIR is already up, the script says so and exits 0.
# Readiness is a smoke `sbatch --wrap true` that must complete (SLURM schedules its first job a few seconds
# after slurmctld answers, so "slurmctld answers" is not enough).
#
# Env: DDKIT_SLURM_GPUS (fake GPUs on the node, default 2), DDKIT_SLURM_CPUS (CPUs the node advertises,
# default nproc; more than nproc oversubscribes, so tiny test jobs overlap their requeue waits),
# DDKIT_SLURM_TIMEOUT (readiness deadline in seconds, default 90).
set -euo pipefail

die() { echo "start-local-cluster: $*" >&2; exit 1; }
log() { echo "start-local-cluster: $*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 STATE_DIR"
[[ $(id -u) -eq 0 ]] || die "needs root (the daemons run as root; apt-get may be needed)"
mkdir -p "$1"
S=$(cd "$1" && pwd -P)
GPUS=${DDKIT_SLURM_GPUS:-2}
DEADLINE_S=${DDKIT_SLURM_TIMEOUT:-90}
T_START=$(date +%s.%N)

# AF_UNIX socket paths must stay under 108 bytes; slurmstepd puts "<node>_<job>.<step>" into the spool dir.
(( ${#S} <= 60 )) || die "STATE_DIR path '$S' is ${#S} bytes; use one of at most 60 (unix socket limit)"

export SLURM_CONF="$S/slurm.conf"

alive() {  # alive NAME: the recorded PID runs and is the process we started (its environment names S)
  local f="$S/pids/$1.pid" pid
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ -r /proc/$pid/environ ]] && tr '\0' '\n' <"/proc/$pid/environ" | grep -qxF "SLURM_CONF=$S/slurm.conf"
}

deadline_wait() {  # deadline_wait SECONDS WHAT CMD...: poll CMD every 0.1 s until it succeeds
  local limit=$1 what=$2; shift 2
  local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || die "$what not ready after ${limit}s (logs: $S/log/)"
    sleep 0.1
  done
}

# ------------------------------------------------------------------------------------------------- packages
need_install=()
for pkg in slurmctld slurmd slurm-client slurmdbd slurm-wlm-mysql-plugin munge mariadb-server; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_install+=("$pkg")
done
if (( ${#need_install[@]} )); then
  log "installing ${need_install[*]}"
  policy_created=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy_created=1
  fi
  trap '[[ $policy_created == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_install[@]}" >/dev/null
  [[ $policy_created == 1 ]] && rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi
MARIADBD=$(command -v mariadbd || echo /usr/sbin/mariadbd)
[[ -x $MARIADBD ]] || die "mariadbd not found after install"

# ------------------------------------------------------------------------------------------- already up?
if alive munged && alive mariadbd && alive slurmdbd && alive slurmctld && alive slurmd \
   && scontrol ping 2>/dev/null | grep -q UP; then
  log "already running (SLURM_CONF=$SLURM_CONF)"
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
# A partial cluster (crash, killed test run) is stopped first so we restart from a known state.
if compgen -G "$S/pids/*.pid" >/dev/null; then
  log "stopping a partial cluster first"
  "$(dirname "$0")/stop-local-cluster.sh" "$S" >/dev/null 2>&1 || true
fi

mkdir -p "$S"/{pids,log,run,ctld,d,dev,db,munge,tmp}
chmod 755 "$S/munge"  # munged wants its socket dir traversable; the key itself is 0400

# ------------------------------------------------------------------------------------------------ ports
if [[ ! -f $S/ports.env ]]; then
  # Ask the kernel for free loopback ports once; later starts reuse them so configs stay stable.
  python3 - >"$S/ports.env" <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
names = ["CTLD_PORT", "SLURMD_PORT", "DBD_PORT", "DB_PORT"]
for n, s in zip(names, socks):
    print(f"{n}={s.getsockname()[1]}")
EOF
fi
# shellcheck disable=SC1091
source "$S/ports.env"

HOST=$(hostname -s)
ADDR=$(getent hosts "$HOST" | awk '{print $1; exit}')
[[ $ADDR == 127.* ]] || ADDR=127.0.0.1  # keep every daemon on loopback
CPUS=${DDKIT_SLURM_CPUS:-$(nproc)}
OVERRIDES=""
(( CPUS > $(nproc) )) && OVERRIDES="SlurmdParameters=config_overrides"  # else slurmd marks the node INVAL
MEM_MB=$(awk '/MemTotal/ {print int($2/1024*0.8)}' /proc/meminfo)
ID=$(printf '%s' "$S" | cksum | cut -c1-6)  # distinguishes clusters on one host (names, db)

# ---------------------------------------------------------------------------------------------- configs
for i in $(seq 0 $((GPUS - 1))); do
  ln -sfn /dev/null "$S/dev/nvidia$i"  # GRES File= must be a character device; /dev/null is one
done

cat >"$S/slurm.conf" <<EOF
# Generated by slurm/start-local-cluster.sh for $S; regenerated at every start.
ClusterName=ddkit$ID
SlurmctldHost=$HOST($ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job waits cred_expire+1 s before it may start again (default 120 s)
AuthInfo=socket=$S/munge/sock,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/d
TmpFS=$S/tmp
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (containers, CI VMs): track processes by parent PID, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default every job takes the node's whole memory and jobs run one at a time.
DefMemPerCPU=1024
ReturnToService=2
SchedulerType=sched/backfill
# sched_interval=2: a requeued job starts within seconds (default pass every 60 s)
SchedulerParameters=sched_interval=2,bf_interval=2,defer_batch=0
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=600
MessageTimeout=20
SlurmctldTimeout=30
SlurmdTimeout=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ADDR
AccountingStoragePort=$DBD_PORT
# The munge socket for slurmdbd connections is named here, not through AuthInfo.
AccountingStoragePass=$S/munge/sock
AccountingStorageTRES=gres/gpu
GresTypes=gpu
$OVERRIDES
NodeName=$HOST NodeAddr=$ADDR CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=gpu Nodes=$HOST Default=YES MaxTime=1-00:00:00 State=UP
PartitionName=cpu Nodes=$HOST Default=NO MaxTime=1-00:00:00 State=UP
EOF

cat >"$S/gres.conf" <<EOF
NodeName=$HOST Name=gpu File=$S/dev/nvidia[0-$((GPUS - 1))]
EOF

DB_PASS=ddkit-local
(umask 077; cat >"$S/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$S/munge/sock
DbdAddr=$ADDR
DbdHost=$HOST
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$S/run/slurmdbd.pid
LogFile=$S/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db_$ID
EOF
)
chmod 600 "$S/slurmdbd.conf"

start() {  # start NAME CMD...: run a daemon in the foreground of its own session, record its PID
  local name=$1; shift
  setsid "$@" </dev/null >>"$S/log/$name.stdout" 2>&1 &
  echo $! >"$S/pids/$name.pid"
}

# ---------------------------------------------------------------------------------------------- munge
if [[ ! -s $S/munge/munge.key ]]; then
  (umask 077; dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none)
  chmod 400 "$S/munge/munge.key"
fi
alive munged || start munged munged -F --force --key-file="$S/munge/munge.key" --socket="$S/munge/sock" \
  --pid-file="$S/run/munged.pid" --log-file="$S/log/munged.log" --seed-file="$S/munge/seed"
deadline_wait 20 munged munge -S "$S/munge/sock" -n

# -------------------------------------------------------------------------------------------- mariadb
if [[ ! -d $S/db/mysql ]]; then
  mariadb-install-db --no-defaults --datadir="$S/db" --user=root --auth-root-authentication-method=socket \
    --skip-test-db >"$S/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed ($S/log/mariadb-install.log)"
fi
alive mariadbd || start mariadbd "$MARIADBD" --no-defaults --user=root --datadir="$S/db" \
  --socket="$S/run/db.sock" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
  --pid-file="$S/run/mariadbd.pid" --log-error="$S/log/mariadbd.log" \
  --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --skip-log-bin
deadline_wait 30 mariadb mariadb-admin --no-defaults --socket="$S/run/db.sock" -uroot ping
mariadb --no-defaults --socket="$S/run/db.sock" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db_$ID;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db_$ID.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF

# ----------------------------------------------------------------------------------------------- slurm
start slurmdbd slurmdbd -D  # reads slurmdbd.conf beside $SLURM_CONF
deadline_wait 30 slurmdbd sacctmgr -n -i list cluster
start slurmctld slurmctld -D -f "$S/slurm.conf"
start slurmd slurmd -D -f "$S/slurm.conf"  # registers as soon as slurmctld answers
deadline_wait 30 slurmctld bash -c "scontrol ping | grep -q UP"
T_DAEMONS=$(date +%s.%N)

cat >"$S/env.sh" <<EOF
export SLURM_CONF=$S/slurm.conf
EOF

# ------------------------------------------------------------------------------------------ readiness
# A smoke job that must complete; the honest check that the node is up and jobs can run.
end=$(( $(date +%s) + DEADLINE_S ))
jid=""
until [[ -n $jid ]]; do
  jid=$(sbatch --parsable --partition=gpu --time=1 --output=/dev/null --job-name=local-cluster-smoke --wrap true 2>/dev/null) || jid=""
  (( $(date +%s) < end )) || die "sbatch kept failing for ${DEADLINE_S}s (logs: $S/log/)"
  [[ -n $jid ]] || sleep 0.2
done
while :; do
  state=$(scontrol show job "$jid" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
  case $state in
    COMPLETED) break ;;
    FAILED|CANCELLED|NODE_FAIL|TIMEOUT|OUT_OF_MEMORY|BOOT_FAIL) die "smoke job $jid ended $state (logs: $S/log/)" ;;
  esac
  (( $(date +%s) < end )) || die "smoke job $jid still '$state' after ${DEADLINE_S}s (logs: $S/log/)"
  sleep 0.1
done
T_END=$(date +%s.%N)
awk -v a="$T_START" -v b="$T_DAEMONS" -v c="$T_END" -v conf="$SLURM_CONF" 'BEGIN {
  printf "start-local-cluster: up in %.1fs (daemons %.1fs, first job %.1fs); SLURM_CONF=%s\n", c - a, b - a, c - b, conf
}' >&2
echo "export SLURM_CONF=$SLURM_CONF"
