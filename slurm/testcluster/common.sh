# Shared by start.sh and stop.sh (sourced, not run).
DIR=${GPUPACK_SLURM_DIR:-/tmp/gpupack-slurm-test}
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin
ME=$(basename "$0")

say() { echo "$ME: $*" >&2; }
cannot() { say "cannot run here: $*"; exit 77; }  # 77: tests skip with this reason
alive() {  # pidfile names a live process (/proc, not kill -0: that fails for other users' daemons)
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]]
}

lock() {  # one start.sh/stop.sh at a time on a directory; fd 9 must not reach the daemons
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 60 9 || { say "another start.sh/stop.sh holds $DIR/.lock"; exit 1; }
}

stop_daemon() {  # pidfile: SIGTERM, wait (slurmctld takes ~2 s), SIGKILL after 10 s
    local pidf=$1 pid
    alive "$pidf" || return 0
    pid=$(cat "$pidf")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    say "pid $pid ignores SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}
