"""A two-node stand-in experiment: each rank joins torch.distributed (gloo, CPU) through the
env:// variables gpupack sets (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK), adds its share with
all_reduce, and writes what it saw to $GPUPACK_OUT/rank-<RANK>.json."""

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
value = torch.tensor([float(10 * (rank + 1))])
dist.all_reduce(value)  # sum over the ranks: 10 + 20 = 30 with two
seen = {k: os.environ.get(k) for k in ("RANK", "NODE_RANK", "GPUPACK_NODE_RANK", "WORLD_SIZE", "GPUPACK_NNODES",
                                       "GPUPACK_NODES", "MASTER_ADDR", "MASTER_PORT", "SLURMD_NODENAME",
                                       "CUDA_VISIBLE_DEVICES")}
seen["sum"] = value.item()
seen["world"] = dist.get_world_size()
dist.destroy_process_group()
with open(os.path.join(os.environ["GPUPACK_OUT"], f"rank-{rank}.json"), "w") as f:
    json.dump(seen, f)
