"""A stand-in experiment for the engine tests: sleeps, and records what it saw in
$GPUPACK_OUT/seen-<attempt>.json (start, end, CUDA_VISIBLE_DEVICES, attempt, resume) and
$GPUPACK_OUT/started-<attempt> as soon as it runs, so tests wait on files, not on time."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("seconds", type=float)
parser.add_argument("--fail-attempts", type=int, default=0, help="exit 1 on the first N attempts")
parser.add_argument("--ignore-preempt", action="store_true", help="ignore USR2 and TERM")
parser.add_argument("--child", action="store_true", help="leave a sleeping grandchild behind")
parser.add_argument("--resumed-seconds", type=float, help="sleep this long instead when resuming")
parser.add_argument("--oom", action="store_true", help="print torch's OOM message and exit 1")
args = parser.parse_args()

out = os.environ["GPUPACK_OUT"]
attempt = os.environ["GPUPACK_ATTEMPT"]
record = {
    "start": time.time(),
    "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "attempt": int(attempt),
    "resume": os.environ.get("GPUPACK_RESUME"),
    "pid": os.getpid(),
    "node": os.environ.get("SLURMD_NODENAME"),  # under Slurm, the node the step ran on
}
preempted = []
if args.ignore_preempt:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGUSR2, lambda *_: preempted.append(time.time()))
if args.child:
    child = subprocess.Popen(["sleep", "300"])
    record["child"] = child.pid


def write_json(name, data):
    """Whole or not at all: tests read these files as soon as they exist."""
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


write_json(f"started-{attempt}", record)
print(f"started attempt {attempt} cvd={record['cvd']} resume={record['resume']}", flush=True)

seconds = args.seconds
if record["resume"] == "1" and args.resumed_seconds is not None:
    seconds = args.resumed_seconds
deadline = time.time() + seconds
while time.time() < deadline and not preempted:
    time.sleep(0.02)
record["end"] = time.time()
record["preempted"] = bool(preempted)
write_json(f"seen-{attempt}.json", record)
if preempted:
    print("preempted: checkpoint saved", flush=True)
    sys.exit(143)
if args.oom:
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
    sys.exit(1)
if int(attempt) <= args.fail_attempts:
    print("failing on purpose", flush=True)
    sys.exit(1)
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"ok": 1}, f)
