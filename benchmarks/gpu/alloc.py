"""A GPU workload for validating gpupack on real GPUs: wait, allocate GB gigabytes with torch,
keep the GPU busy with matrix products for SECONDS, write results.json.

    python benchmarks/gpu/alloc.py --gb 20 --seconds 20 [--delay 3] --out DIR
"""

import argparse
import json
import os
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--gb", type=float, required=True, help="GPU memory to allocate (10^9 bytes)")
parser.add_argument("--seconds", type=float, default=10.0)
parser.add_argument("--delay", type=float, default=0.0, help="seconds before allocating (start-up race)")
parser.add_argument("--out", required=True)
args = parser.parse_args()

time.sleep(args.delay)
device = torch.device("cuda")
block = torch.empty(int(args.gb * 1e9), dtype=torch.uint8, device=device)
block.fill_(1)
a = torch.randn(2048, 2048, device=device)
end = time.time() + args.seconds
steps = 0
while time.time() < end:
    a = (a @ a).clamp_(-1, 1)
    steps += 1
torch.cuda.synchronize()
result = {
    "gb": args.gb,
    "steps": steps,
    "max_allocated_bytes": torch.cuda.max_memory_allocated(),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "device_name": torch.cuda.get_device_name(0),
}
tmp = os.path.join(args.out, ".results.json.tmp")
with open(tmp, "w") as f:
    json.dump(result, f)
os.replace(tmp, os.path.join(args.out, "results.json"))
print(json.dumps(result))
