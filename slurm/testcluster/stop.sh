#!/usr/bin/env bash
# Stop the test cluster of start.sh: cancel every job, wait until the queue is empty (stopping
# slurmd alone would leave the jobs' slurmstepd running), stop every slurmd and slurmctld, and the
# munged that start.sh started (a system munged is left alone). Safe to run twice.
# Exit codes: 0 stopped (or nothing to stop); 77 not root; 1 jobs would not go away.
set -euo pipefail
source "$(dirname "$0")/common.sh"

slurmds=()  # one pid file per node: slurmd.pid (one node) or slurmd-<node>.pid (--nodes N)
for pidf in "$DIR"/run/slurmd*.pid; do alive "$pidf" && slurmds+=("$pidf"); done
if ! alive "$DIR/run/slurmctld.pid" && [[ ${#slurmds[@]} -eq 0 && ! -f $DIR/.munged-ours ]]; then
    say "nothing running ($DIR)"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || cannot "needs root to stop the daemons (uid $(id -u))"
lock

if alive "$DIR/run/slurmctld.pid" && [[ ${#slurmds[@]} -gt 0 ]]; then
    mapfile -t ids < <(squeue -h -o %i 2>/dev/null || true)
    if [[ ${#ids[@]} -gt 0 ]]; then
        say "cancelling ${#ids[@]} job(s): ${ids[*]}"
        scancel "${ids[@]}" 2>/dev/null || true
        # Jobs that ignore SIGTERM get SIGKILL after KillWait: allow for it and a bit.
        killwait=$(sed -n 's/^KillWait=//p' "$CONF" 2>/dev/null)
        deadline=$((SECONDS + ${killwait:-30} + 30))
        while [[ -n $(squeue -h -o %i 2>/dev/null) ]]; do
            ((SECONDS < deadline)) || { say "jobs still queued: $(squeue -h -o '%i %T' | tr '\n' ' ')"; exit 1; }
            sleep 0.2
        done
    fi
fi
for pidf in "${slurmds[@]}"; do stop_daemon "$pidf"; done
stop_daemon "$DIR/run/slurmctld.pid"
if [[ -f $DIR/.munged-ours ]]; then
    stop_daemon /run/munge/munged.pid
    rm -f "$DIR/.munged-ours"
fi
say "stopped ($DIR)"
