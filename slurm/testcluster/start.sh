#!/usr/bin/env bash
# Start a Slurm test cluster (munge + slurmctld + one slurmd per node) with 4 fake GPUs per node,
# for gpupack's Slurm tests. Debian/Ubuntu, root, no systemd needed. Safe to run twice: a running
# cluster with the same config is left alone; a changed config restarts the daemons.
#
#     start.sh              one node named after this host (`hostname -s`)
#     start.sh --nodes 2    nodes n1, n2 (env GPUPACK_SLURM_NODES=2): one slurmd per node, all on
#                           this host (`slurmd -N n1`, NodeHostname=localhost, one port each)
#
# stdout: only the last line, `export SLURM_CONF=<dir>/etc/slurm.conf`, so that
#     eval "$(slurm/testcluster/start.sh)"
# sets up the shell; progress and errors go to stderr.
# Exit codes: 0 up; 77 cannot run here (no root, no apt, not Debian): one-line reason on
# stderr, tests skip with it; 1 failed to start (log tails on stderr).
#
# Environment (defaults in brackets):
#   GPUPACK_SLURM_DIR [/tmp/gpupack-slurm-test]   configs, state, logs, fake devices
#   GPUPACK_SLURM_NODES [1]   number of nodes (also --nodes N); 2 or more are named n1, n2, ...
#   GPUPACK_SLURM_CPUS [16]  GPUPACK_SLURM_GPUS [4]  CPUs and GPUs each node declares
#   GPUPACK_SLURM_KILLWAIT [5]    seconds between SIGTERM and SIGKILL (cancel, time limit)
#   GPUPACK_SLURM_CTLD_PORT [6817]  GPUPACK_SLURM_SLURMD_PORT [6818]  (node k: 6818 + k - 1)
#   GPUPACK_SLURM_START_TIMEOUT [30]  seconds to wait for the node to become usable
#   GPUPACK_SLURM_SELECT [CR_Core]  SelectTypeParameters (CR_Core_Memory: memory is consumable)
#   GPUPACK_SLURM_CONF_EXTRA []     more slurm.conf lines (e.g. "DefMemPerCPU=1000")
#   GPUPACK_SLURM_GRACETIME [10]    seconds a job preempted by one in partition "urgent" has to go
set -euo pipefail

source "$(dirname "$0")/common.sh"
NODES=${GPUPACK_SLURM_NODES:-1}
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || { say "usage: $ME [--nodes N]"; exit 2; };;
        --nodes=*) NODES=${1#--nodes=}; shift;;
        *) say "usage: $ME [--nodes N]"; exit 2;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { say "--nodes: expected a number of nodes, got '$NODES'"; exit 2; }
CPUS=${GPUPACK_SLURM_CPUS:-16}
GPUS=${GPUPACK_SLURM_GPUS:-4}
KILLWAIT=${GPUPACK_SLURM_KILLWAIT:-5}
CTLD_PORT=${GPUPACK_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${GPUPACK_SLURM_SLURMD_PORT:-6818}
TIMEOUT=${GPUPACK_SLURM_START_TIMEOUT:-30}
SELECT=${GPUPACK_SLURM_SELECT:-CR_Core}
EXTRA=${GPUPACK_SLURM_CONF_EXTRA:-}
GRACETIME=${GPUPACK_SLURM_GRACETIME:-10}
CTLD_HOST=$(hostname -s)
if [[ $NODES -eq 1 ]]; then
    NODE_NAMES=("$CTLD_HOST")
    NODE_SET=$CTLD_HOST
else
    # Several slurmd on one host (Debian builds Slurm with multiple-slurmd support): each has its
    # own name, port, and (through %n) its own spool, pid and log files.
    NODE_NAMES=()
    for ((k = 1; k <= NODES; k++)); do NODE_NAMES+=("n$k"); done
    NODE_SET="n[1-$NODES]"
fi
slurmd_pidfile() { if [[ $NODES -eq 1 ]]; then echo "$DIR/run/slurmd.pid"; else echo "$DIR/run/slurmd-$1.pid"; fi; }
daemons_alive() {
    alive "$DIR/run/slurmctld.pid" || return 1
    local n
    for n in "${NODE_NAMES[@]}"; do alive "$(slurmd_pidfile "$n")" || return 1; done
}

fail() {
    say "FAILED: $*"
    for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd*.log; do
        [[ -f $f ]] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}
# Node states in which jobs can start (sinfo %T, lower case; a trailing * = not responding).
node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | head -n1; }
node_usable() { case $(node_state "$1") in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }
usable() {
    local n
    for n in "${NODE_NAMES[@]}"; do node_usable "$n" || return 1; done
}

need_pkgs=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair##*:}")
done

# --- configs (rendered, then compared with what runs, so a second run can tell whether anything changed).
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# Slurm only sets CUDA_VISIBLE_DEVICES for GRES backed by a character device; a symlink to
# /dev/null passes its stat() check, so no mknod is needed.
gres_files="$DIR/dev/gpu[0-$((GPUS - 1))]"
[[ $GPUS -eq 1 ]] && gres_files="$DIR/dev/gpu0"
gres_node="Gres=gpu:$GPUS"
[[ $GPUS -eq 0 ]] && gres_node=""
node_suffix="" log_suffix="" node_host=""
if [[ $NODES -gt 1 ]]; then
    node_suffix=/%n log_suffix=-%n
    node_host="NodeHostname=localhost Port=$SLURMD_PORT-$((SLURMD_PORT + NODES - 1)) "
fi
render_slurm_conf() {
cat <<CONF
# Written by gpupack slurm/testcluster/start.sh; edits are overwritten.
ClusterName=gpupacktest
SlurmctldHost=$CTLD_HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also the delay before a requeued job may start again (default 120 s).
AuthInfo=cred_expire=10
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool$node_suffix
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$(slurmd_pidfile %n)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd$log_suffix.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
# CR_Core: memory is not consumable, so nothing blocks on memory.
SelectTypeParameters=$SELECT
# sbatch -> running in ~1 s, requeued jobs picked up within 5 s.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
GresTypes=gpu
ReturnToService=2
# Lets the node declare more CPUs than the machine has (otherwise INVAL "Low CPUs").
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
KillWait=$KILLWAIT
MinJobAge=300
MailProg=/bin/true
$EXTRA
NodeName=$NODE_SET ${node_host}NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=${mem_mb:-1000} $gres_node State=UNKNOWN
# A job in "urgent" preempts jobs in "debug" (the default) that hold what it needs: they get
# SIGTERM with GraceTime to go, then are requeued (tests/test_slurm_cluster.py, preemption).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$NODE_SET Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACETIME
PartitionName=urgent Nodes=$NODE_SET MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
}
render_gres_conf() {
    [[ $GPUS -eq 0 ]] && return 0
    if [[ $NODES -eq 1 ]]; then echo "Name=gpu File=$gres_files"; else echo "NodeName=$NODE_SET Name=gpu File=$gres_files"; fi
}
same_config() { cmp -s <(render_slurm_conf) "$CONF" && cmp -s <(render_gres_conf) "$DIR/etc/gres.conf"; }

# Already up with this very config (the common case of a second run): nothing to do, any user.
if [[ ${#need_pkgs[@]} -eq 0 ]] && daemons_alive && same_config && usable; then
    say "already running ($DIR)"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || cannot "needs root to install and start munge/slurmctld/slurmd (uid $(id -u))"

if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    command -v apt-get >/dev/null || cannot "packages missing (${need_pkgs[*]}) and no apt-get"
    say "installing ${need_pkgs[*]}"
    # The postinsts would start the daemons with the distribution's config; forbid that when the
    # image does not already (Debian docker images ship a policy-rc.d that exits 101).
    made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    # Without --no-install-recommends apt pulls ~40 plugin packages (hdf5, rocm-smi, influxdb).
    if ! { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends munge slurmctld slurmd slurm-client >&2; }; then
        [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
        cannot "apt-get install munge slurmctld slurmd slurm-client failed"
    fi
    [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
fi

lock

# --- munge: reuse a running munged (system or ours), else start one without systemd.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged 9>&-
    touch "$DIR/.munged-ours"
    munge -n | unmunge >/dev/null || fail "munged started but munge -n | unmunge fails"
fi

if daemons_alive && same_config; then
    say "daemons running with this config"
else
    # A changed slurm.conf needs every daemon restarted (slurmd alone: "different slurm.conf"),
    # including the slurmd of nodes a different --nodes started.
    for pidf in "$DIR"/run/slurmd*.pid; do [[ -e $pidf ]] && stop_daemon "$pidf"; done
    stop_daemon "$DIR/run/slurmctld.pid"
    # One cluster per set of ports: refuse to fight daemons that are not ours.
    for port in "$CTLD_PORT" $(seq "$SLURMD_PORT" $((SLURMD_PORT + NODES - 1))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            fail "port $port is in use (another Slurm? slurmctld pids: $(pgrep -x slurmctld | tr '\n' ' ')); stop it or set GPUPACK_SLURM_CTLD_PORT/GPUPACK_SLURM_SLURMD_PORT"
        fi
    done
    mkdir -p "$DIR"/{etc,state,spool,run,log,dev}
    # Each slurmd needs its spool directory to exist ("Domain socket directory ... No such file").
    [[ $NODES -gt 1 ]] && for n in "${NODE_NAMES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$DIR/dev/gpu$i"; done
    render_slurm_conf >"$CONF"
    render_gres_conf >"$DIR/etc/gres.conf"   # slurmd reads it from slurm.conf's directory
    # -c: forget saved job and node state, so a node DRAINed by an earlier bad start comes back.
    slurmctld -c -f "$CONF" 9>&- || fail "slurmctld did not start"
    for n in "${NODE_NAMES[@]}"; do
        slurmd -f "$CONF" -N "$n" 9>&- || fail "slurmd -N $n did not start"
    done
    say "started slurmctld and ${#NODE_NAMES[@]} slurmd ($DIR)"
fi

deadline=$((SECONDS + TIMEOUT))
declare -A resumed=()
for n in "${NODE_NAMES[@]}"; do
    until node_usable "$n"; do
        state=$(node_state "$n" || true)
        # A node left down by a test (scontrol update state=down) or DRAINed by an earlier bad start.
        if [[ -z ${resumed[$n]:-} && $state =~ drain|down|inval|fail ]]; then
            scontrol update nodename="$n" state=resume >&2 2>/dev/null || true
            resumed[$n]=1
        fi
        ((SECONDS < deadline)) || fail "node $n not usable after ${TIMEOUT}s (sinfo state: '${state:-none}')"
        sleep 0.1
    done
done
say "node(s) ${NODE_NAMES[*]}: $(node_state "${NODE_NAMES[0]}"), each $CPUS CPUs, gpu:$GPUS"
echo "export SLURM_CONF=$CONF"
