"""The GPUs of every node of an allocation as one GpuProbe.

The batch node keeps its own in-process probe; every other node has a reader step
(gpupack._reader) whose JSON lines a thread collects. `PoolProbe.read()` merges them into one
Reading, so the engine and the policy see one pool of GPUs keyed (node, index):

- a reader that exits is started again, at most every `restart_every_s`;
- a node not heard from for `stale_s` (default 30 s, env GPUPACK_READER_STALE_S; never less than
  three reader intervals) has its GPUs marked unavailable, "not heard from for 42s", so nothing
  new starts there until its readings resume;
- a node the allocation lost (slurm_nodes.NodeWatch) has its GPUs unavailable for good, and its
  reader is not restarted;
- a simulated node (the reader was given `--gpus`) reports only that it is alive: its memory is
  computed here from the budgets of what runs there, exactly as for the batch node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _reader
from .gpus import GpuInfo, GpuProbe, Reading, SimulatedProbe
from .policy import GpuKey, GpuSnapshot, Occupant
from .slurm import Allocation
from .slurm_nodes import NodeWatch, reader_argv, srun_env

STALE_S = 30.0
RESTART_EVERY_S = 5.0


class LostNodes(Protocol):
    def lost(self, now: float, force: bool = False) -> Mapping[str, str]: ...


@dataclass
class NodeReader:
    """One reader process (its srun client) and what it said last. Lines arrive on a thread."""

    node: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    clock: Callable[[], float] = time.time
    inventory: list[GpuInfo] | None = None
    simulated: bool = False
    reading: Mapping[str, Any] | None = None  # the last reading line (read() picks its attempts' usage)
    heard_at: float | None = None  # local time of the last line of ours
    lines: int = 0  # lines of ours received, over every start
    last_message: str = ""  # the last line that was not ours (srun's or the reader's error)
    started_at: float = 0.0
    starts: int = 0
    _proc: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _got_inventory: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def start(self) -> None:
        self.started_at = self.clock()
        self.starts += 1
        self._proc = subprocess.Popen(
            list(self.argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=None if self.env is None else dict(self.env), start_new_session=True,
        )
        threading.Thread(target=self._listen, args=(self._proc,), daemon=True,
                         name=f"gpupack-reader-{self.node}").start()

    def _listen(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                obj = _reader.parse_line(line)
            except _reader.WireError as exc:
                if str(exc):
                    with self._lock:
                        self.last_message = str(exc)[:300]
                continue
            with self._lock:
                try:
                    if obj["kind"] == "inventory":
                        self.inventory = _reader.inventory_from(obj, self.node)
                        self.simulated = bool(obj.get("simulated"))
                        self._got_inventory.set()
                    elif self.inventory is not None:
                        _reader.reading_from(obj, self.inventory)  # refuses a malformed line here
                        self.reading = obj
                except _reader.WireError as exc:
                    self.last_message = str(exc)[:300]
                    continue
                self.heard_at = self.clock()
                self.lines += 1
        proc.wait()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_inventory(self, timeout_s: float) -> bool:
        return self._got_inventory.wait(timeout_s)

    def latest(self) -> tuple[Mapping[str, Any] | None, float | None]:
        with self._lock:
            return self.reading, self.heard_at

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # srun passes it on to the reader step
            proc.wait(5)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()


def stale_limit_s(every_s: float, env: Mapping[str, str]) -> float:
    try:
        limit = float(env.get("GPUPACK_READER_STALE_S", "") or STALE_S)
    except ValueError:
        limit = STALE_S
    return max(limit, 3 * every_s)


class PoolProbe:
    """`local` reads the batch node; `readers` the others. Implements GpuProbe."""

    def __init__(
        self,
        local: GpuProbe,
        readers: Sequence[NodeReader],
        *,
        stale_s: float = STALE_S,
        restart_every_s: float = RESTART_EVERY_S,
        watch: LostNodes | None = None,
        clock: Callable[[], float] = time.time,
        note: Callable[[str], None] = lambda message: None,
    ):
        self.local = local
        self.readers = list(readers)
        self.stale_s = stale_s
        self.restart_every_s = restart_every_s
        self.watch = watch
        self.clock = clock
        self.note = note  # node lost / silent / back: one line for the run's events
        self._inventory: list[GpuInfo] = list(local.inventory())
        self._simulated: dict[str, SimulatedProbe] = {}
        self._unavailable: dict[str, str] = {}  # node -> reason, as last noted
        self._attempts: dict[str, int] | None = None  # current attempts (track), None: any
        self._ended: set[str] = set()  # nodes whose reader had ended at the last read

    def start(self, timeout_s: float = 60.0) -> list[str]:
        """Start every reader and wait for their inventories; returns one line per node that did
        not answer in time (left out of the pool: the engine's inventory is fixed at the start)."""
        for r in self.readers:
            r.start()
        deadline = self.clock() + timeout_s
        problems = []
        for r in self.readers:
            while not r.wait_inventory(0.1):
                if not r.running() or self.clock() > deadline:
                    break
            if r.inventory is None:
                why = r.last_message or ("its reader exited" if not r.running() else f"no answer in {timeout_s:g}s")
                problems.append(f"node {r.node}: GPUs not read ({why}); it is left out of the pool")
                continue
            self._inventory += r.inventory
            if r.simulated:
                self._simulated[r.node] = SimulatedProbe(r.inventory)
        self.readers = [r for r in self.readers if r.inventory is not None]
        return problems

    def inventory(self) -> list[GpuInfo]:
        return list(self._inventory)

    def track(self, run_dir: str, attempts: Mapping[str, int]) -> None:
        """Whose memory is whose (NvmlProbe.track): the readers' usage is kept only for these
        current attempts."""
        self._attempts = dict(attempts)
        track = getattr(self.local, "track", None)
        if track is not None:
            track(run_dir, attempts)

    def read(self, running: Mapping[str, Occupant]) -> Reading:
        now = self.clock()
        local = self.local.read(running)
        gpus: list[GpuSnapshot] = list(local.gpus)
        usage: dict[str, dict[GpuKey, int]] = {n: dict(u) for n, u in local.usage.items()}
        # A reader that ended since the last look: ask Slurm now whether its node is gone (once,
        # not on every tick while a lost node's reader stays ended).
        ended = {r.node for r in self.readers if not r.running()}
        fresh = bool(ended - self._ended)
        self._ended = ended
        lost: Mapping[str, str] = self.watch.lost(now, force=fresh) if self.watch else {}
        for r in self.readers:
            assert r.inventory is not None
            why = lost.get(r.node, "")
            if not why and not r.running() and now - r.started_at >= self.restart_every_s:
                r.start()
            reading, heard_at = r.latest()
            if not why and (heard_at is None or now - heard_at > self.stale_s):
                silent = now - (heard_at if heard_at is not None else r.started_at)
                if silent > self.stale_s:
                    why = f"not heard from for {silent:.0f}s"
            if why or reading is None:
                gpus += [GpuSnapshot(g.node, g.index, g.total_bytes, None, None, g.uuid, unavailable=why) for g in r.inventory]
            elif r.node in self._simulated:
                gpus += self._simulated[r.node].read(running).gpus
            else:
                remote = _reader.reading_from(reading, r.inventory, self._attempts)
                gpus += remote.gpus
                for name, per_gpu in remote.usage.items():
                    usage.setdefault(name, {}).update(per_gpu)
            self._changed(r, why)
        return Reading(tuple(gpus), usage)

    def _changed(self, r: NodeReader, why: str) -> None:
        before = self._unavailable.get(r.node, "")
        if bool(why) == bool(before) and (not why or why.split(" for ")[0] == before.split(" for ")[0]):
            return
        self._unavailable[r.node] = why
        if why:
            extra = f" (its reader said: {r.last_message})" if r.last_message and "allocation" not in why else ""
            self.note(f"node {r.node} {why}{extra}: nothing new starts on its GPUs")
        else:
            self.note(f"node {r.node}: readings resumed; its GPUs take experiments again")

    def close(self) -> None:
        for r in self.readers:
            r.stop()
        close = getattr(self.local, "close", None)
        if close is not None:
            close()



def for_allocation(
    local: GpuProbe, allocation: Allocation, run_dir: str, spec: str | None, every_s: float, env: Mapping[str, str],
    python: str = sys.executable,
) -> tuple[PoolProbe, NodeWatch, list[str]]:
    """The pool of a multi-node allocation: `local` reads the batch node, a reader step each
    other node. With `spec` every node simulates it, each only with the GPUs the job holds there
    (_reader.simulated_node: nodes may differ). Returns the probe (readers started, inventories
    in), the watch of lost nodes it shares with the launcher, and one line per node left out."""
    batch = allocation.batch_node or allocation.nodes[0]
    if spec and isinstance(local, SimulatedProbe):
        local = SimulatedProbe(_reader.simulated_node(spec, batch, env, allocation.nodes))
    watch = NodeWatch(allocation.job_id, allocation.nodes)
    readers = [
        NodeReader(node, reader_argv(node, python, every_s, run_dir, spec, _held(allocation, node), allocation.nodes),
                   srun_env(env))
        for node in allocation.nodes
        if node != batch
    ]
    probe = PoolProbe(local, readers, stale_s=stale_limit_s(every_s, env), watch=watch)
    return probe, watch, probe.start()


def _held(allocation: Allocation, node: str) -> int | None:
    """The job's GPU count on `node` where Slurm said (scontrol show job -d), else None."""
    return len(allocation.node_gpu_ids[node]) if node in allocation.node_gpu_ids else None
