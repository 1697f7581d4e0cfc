"""A trainer with DataLoader-like children, for the preemption tests.

The parent starts WORKERS child processes that handle no signal at all (like DataLoader
workers or torchrun's agent), then "trains" step by step. On the preempt signal (through
gpupack.job) it notes which children are still alive, checkpoints its step and exits 128+sig;
a resumed attempt continues from the checkpoint. Files in $GPUPACK_OUT:
  started-<attempt>   {"pid", "workers": [pids]} as soon as the workers run
  checkpoint.json     {"step", "workers_alive"} written on preemption
  results.json        {"steps", "resumed_from"} at the end
"""

import json
import os
import subprocess
import sys
import threading
import time

from gpupack import job

WORKERS = 4
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
out = job.out_dir()
attempt = job.attempt()
# Plain children with default signal dispositions: a preempt signal sent to them kills them.
workers = [subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)"]) for _ in range(WORKERS)]
stop = threading.Event()
job.on_preempt(stop.set)
(out / f"started-{attempt}").write_text(json.dumps({"pid": os.getpid(), "workers": [w.pid for w in workers]}))

ckpt = out / "checkpoint.json"
step = json.loads(ckpt.read_text())["step"] if job.resuming() and ckpt.exists() else 0
resumed_from = step
while step < STEPS:
    if stop.is_set():
        alive = sum(w.poll() is None for w in workers)  # still running while the parent checkpoints
        job.write_results({"step": step, "workers_alive": alive}, ckpt)
        print(f"preempted at step {step} with {alive} of {WORKERS} workers alive", flush=True)
        for w in workers:
            w.kill()
            w.wait()
        sig = job.preempt_signal()
        raise SystemExit(128 + int(sig) if sig is not None else 1)
    step += 1
    if not job.resuming():
        time.sleep(0.01)  # the first attempt lasts until it is preempted; the resumed one hurries
for w in workers:
    w.kill()
    w.wait()
job.write_results({"steps": step, "resumed_from": resumed_from})
