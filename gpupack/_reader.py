"""The GPU reader of a node that is not the batch node: `python -m gpupack._reader`.

gpupack runs one per other node of a multi-node allocation, as an `srun --overlap` step there
(slurm/README.md, "Several nodes"). It reads that node's GPUs with the same probes as the batch
node (NvmlProbe, whose per-process memory is attributed from this node's /proc; or, with
`--gpus SPEC` / GPUPACK_GPUS, a SimulatedProbe) and writes JSON lines to stdout, one object each:

    {"kind": "inventory", "node": "n2", "simulated": false,
     "gpus": [{"index": 0, "total_bytes": 85899345920, "name": "NVIDIA H100", "uuid": "GPU-..", "cuda_id": "0"}]}
    {"kind": "reading", "node": "n2", "t": 1796284512.0,
     "gpus": [[0, 80530636800, 35.0, ""]],    # index, free bytes, utilization %, unavailable; null = failed
     "usage": {"2:bridge-sst2-s42": {"0": 5368709120}}}   # attempt:experiment -> GPU index -> bytes

first the inventory, then a reading every `--every` seconds. It exits when nobody reads its
output any more (the srun client is gone). Memory is attributed to the processes of `--run-dir`
by their attempt identity (gpupack.procs), keyed by attempt and experiment so that the batch
node, which knows each experiment's current attempt, keeps only those. Simulated GPUs have no
occupants here: the batch node computes their memory from what it launched, so their readings
only say "alive".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from .gpus import GpuInfo, GpuProbe, NvmlError, NvmlProbe, Reading, SimulatedProbe, parse_gpu_spec
from .policy import GpuKey, GpuSnapshot
from .procs import identity


def inventory_line(node: str, gpus: Sequence[GpuInfo], simulated: bool) -> str:
    items = [
        {"index": g.index, "total_bytes": g.total_bytes, "name": g.name, "uuid": g.uuid, "cuda_id": g.cuda_id}
        for g in gpus
    ]
    return json.dumps({"kind": "inventory", "node": node, "simulated": simulated, "gpus": items})


def reading_line(node: str, reading: Reading, now: float) -> str:
    gpus = [[g.index, g.free_bytes, g.util_percent, g.unavailable] for g in reading.gpus]
    usage = {name: {str(k[1]): b for k, b in per_gpu.items()} for name, per_gpu in reading.usage.items()}
    return json.dumps({"kind": "reading", "node": node, "t": now, "gpus": gpus, "usage": usage})


class WireError(ValueError):
    pass


def parse_line(line: str) -> dict[str, Any]:
    """One line of a reader; WireError for anything that is not one of its JSON objects (srun's
    own messages on the same stream, a torn line)."""
    try:
        obj = json.loads(line)
    except ValueError:
        raise WireError(line.strip()) from None
    if not isinstance(obj, dict) or obj.get("kind") not in ("inventory", "reading"):
        raise WireError(line.strip())
    return obj


def inventory_from(obj: Mapping[str, Any], node: str) -> list[GpuInfo]:
    """The GpuInfo list of an inventory line, named after `node` (the node gpupack asked)."""
    try:
        return [
            GpuInfo(node, int(g["index"]), int(g["total_bytes"]), str(g["name"]), str(g["uuid"]), str(g["cuda_id"]))
            for g in obj["gpus"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad inventory: {exc}") from None


def reading_from(obj: Mapping[str, Any], inventory: Sequence[GpuInfo], attempts: Mapping[str, int] | None = None) -> Reading:
    """The Reading of a reading line, for the GPUs of `inventory` (others are dropped); usage
    only of the current `attempts` of experiments (None: of any attempt)."""
    by_index = {g.index: g for g in inventory}
    snaps: list[GpuSnapshot] = []
    try:
        for index, free, util, unavailable in obj["gpus"]:
            g = by_index.get(int(index))
            if g is not None:
                snaps.append(GpuSnapshot(g.node, g.index, g.total_bytes,
                                         None if free is None else int(free),
                                         None if util is None else float(util), g.uuid, str(unavailable or "")))
        usage: dict[str, dict[GpuKey, int]] = {}
        for key, per_gpu in obj.get("usage", {}).items():
            attempt, _, name = str(key).partition(":")
            if attempts is not None and str(attempts.get(name)) != attempt:
                continue  # an earlier attempt's straggler, or another run's
            for index, used in per_gpu.items():
                g = by_index.get(int(index))
                if g is not None:
                    usage.setdefault(name, {})[g.key] = int(used)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad reading: {exc}") from None
    return Reading(tuple(snaps), usage)


class AttemptNvmlProbe(NvmlProbe):
    """NvmlProbe whose usage is keyed "attempt:experiment", for the processes of `run_dir`."""

    def __init__(self, node: str, run_dir: str | None, env: Mapping[str, str]):
        super().__init__(node, env=env)
        self.run_dir = run_dir

    def _owner(self, pid: int) -> str | None:
        ident = identity(pid)
        if ident is None or (self.run_dir is not None and ident.run_dir != self.run_dir):
            return None
        return f"{ident.attempt}:{ident.experiment}"


def simulated_node(spec: str, node: str, env: Mapping[str, str], names: Sequence[str] = ()) -> list[GpuInfo]:
    """The simulated GPUs of `node` that a job step there may use. `spec` describes the nodes'
    hardware: a one-node spec (4x80GB) every node's, a spec of several (4x80GB+2x40GB) node i
    of `names` (the allocation's nodes) gets its i-th. As NVML does, only the GPUs
    CUDA_VISIBLE_DEVICES names count (a job may hold 2 of a node's 4), numbered from 0 in that
    order (all of them when it is unset)."""
    gpus = [g for g in parse_gpu_spec(spec, node, names) if g.node == node]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    by_id = {g.cuda_id: g for g in gpus}
    chosen = [by_id[t] for t in (t.strip() for t in visible.split(",")) if t in by_id]
    return [GpuInfo(node, i, g.total_bytes, g.name, g.uuid, g.cuda_id) for i, g in enumerate(chosen)]


def open_reader_probe(
    node: str, spec: str | None, run_dir: str | None, env: Mapping[str, str], names: Sequence[str] = ()
) -> tuple[GpuProbe, bool]:
    """(probe, simulated). NVML unless a spec asks for simulated GPUs; NVML failing is an error
    here (the batch node decides what to do about a node it cannot read)."""
    spec = spec or env.get("GPUPACK_GPUS") or None
    if spec:
        return SimulatedProbe(simulated_node(spec, node, env, names)), True
    probe = AttemptNvmlProbe(node, run_dir, env)
    if not probe.inventory():
        raise NvmlError("; ".join(probe.problems) or "NVML found no GPU")
    return probe, False


def serve(node: str, probe: GpuProbe, simulated: bool, every_s: float, out: TextIO,
          clock: Any = time.time, sleep: Any = time.sleep, count: int | None = None) -> None:
    """Inventory, then a reading every `every_s` (`count` readings, None = until stdout closes)."""
    out.write(inventory_line(node, probe.inventory(), simulated) + "\n")
    out.flush()
    n = 0
    while count is None or n < count:
        out.write(reading_line(node, probe.read({}), clock()) + "\n")
        out.flush()
        n += 1
        if count is None or n < count:
            sleep(every_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpupack._reader", description=__doc__.splitlines()[0])
    parser.add_argument("--node", default=os.environ.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0])
    parser.add_argument("--every", type=float, default=5.0, help="seconds between readings")
    parser.add_argument("--gpus", default=None, help="simulated GPUs of this node, e.g. 4x80GB")
    parser.add_argument("--run-dir", default=None, help="attribute memory to this run's experiments only")
    parser.add_argument("--nodes", default="", help="the allocation's nodes, for a --gpus spec of several")
    args = parser.parse_args(argv)
    try:
        names = [n for n in args.nodes.split(",") if n]
        probe, simulated = open_reader_probe(args.node, args.gpus, args.run_dir, os.environ, names)
    except Exception as exc:  # no NVML, no driver, bad spec: one line for the batch node's log
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"gpupack reader on {args.node}: cannot read GPUs: {why}", file=sys.stderr, flush=True)
        return 1
    try:
        serve(args.node, probe, simulated, max(0.1, args.every), sys.stdout)
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the batch node stopped listening
    finally:
        close = getattr(probe, "close", None)
        if close is not None:
            close()
    try:
        sys.stdout.close()
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
