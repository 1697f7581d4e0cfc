#!/usr/bin/env bash
# A stand-in experiment for the crash and preemption tests. Usage: ledger.sh LEDGER NAME SECONDS
# Appends "start"/"end"/"preempted" lines (name, attempt, resume flag, time) to LEDGER, and
# writes $GPUPACK_OUT/results.json atomically before its "end" line.
ledger=$1 name=$2 seconds=$3
now() { date +%s.%N; }
echo "start $name $GPUPACK_ATTEMPT resume=${GPUPACK_RESUME:-0} $(now)" >> "$ledger"
trap 'echo "preempted $name $GPUPACK_ATTEMPT resume=${GPUPACK_RESUME:-0} $(now)" >> "$ledger"; exit 143' USR2
sleep "$seconds" & wait $!
# The work is done: a preempt signal from now on is ignored, as a trainer that has finished ignores
# it. Otherwise bash runs the trap after the last line, and an attempt that wrote "end" would
# exit 143 (interrupted, so run again): twice "end" in the ledger.
trap '' USR2
printf '{"name": "%s", "attempt": %s}\n' "$name" "$GPUPACK_ATTEMPT" > "$GPUPACK_OUT/.results.tmp"
mv "$GPUPACK_OUT/.results.tmp" "$GPUPACK_OUT/results.json"
echo "end $name $GPUPACK_ATTEMPT resume=${GPUPACK_RESUME:-0} $(now)" >> "$ledger"
