"""A stand-in multi-node experiment: one process per node (rank), as gpupack starts them for
`nodes: K`. The ranks meet through torch.distributed (gloo, CPU, env:// from MASTER_ADDR and
MASTER_PORT), all-reduce rank + 1, and each writes what it saw to $GPUPACK_OUT/rank-<RANK>.json."""

import json
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="env://", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
names = ("RANK", "NODE_RANK", "GPUPACK_NODE_RANK", "WORLD_SIZE", "GPUPACK_NNODES", "GPUPACK_NODES", "MASTER_ADDR",
         "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
seen = {k: os.environ.get(k) for k in names} | {"sum": value.item()}
path = os.path.join(os.environ["GPUPACK_OUT"], f"rank-{os.environ['RANK']}.json")
with open(path + ".tmp", "w") as f:
    json.dump(seen, f)
os.replace(path + ".tmp", path)
dist.destroy_process_group()
