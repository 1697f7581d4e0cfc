"""The run loop: probe -> reap -> policy -> launch -> record -> render, and the signals.

A tick happens when a child exits (SIGCHLD wakes the loop through a self-pipe) or every
`poll_s` seconds. On the allocation's warning signal (USR1), SIGTERM or SIGINT the engine stops
launching, forwards the preempt signal to every running experiment, waits for them until the
grace period is over, kills what is left, records them interrupted, asks Slurm to requeue the
job when work is left, and exits 3. A second signal skips the rest of the grace period.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import policy, recovery
from .estimates import Learned, oom_budget, resumed_time_s
from .exits import EXIT_FAILED, EXIT_OK, EXIT_STOPPED
from .gpus import GpuInfo, GpuProbe, Reading
from .hooks import Hooks, RunOptions
from .launch import Handle, LaunchSpec, Launcher, experiment_env, free_port
from .manifest import Experiment, Manifest
from .outcome import judge
from .policy import GpuKey, Occupant, State
from .request import request_for
from .signals import StopSignals, preempt_signal
from .states import (
    A_FAILED,
    A_INTERRUPTED,
    A_SUCCEEDED,
    FAILED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    WAITING,
    queue_state,
)
from .store import UNAVAILABLE_META, Event, ExperimentRow, Store, StoreError
from .units import format_bytes, format_duration

MAX_OOM_RETRIES = 3  # CUDA OOM retries with a raised budget; they do not use up `retries`
IDLE_TICKS_BEFORE_GIVING_UP = 3
COMPACT_EVERY_S = 600.0
# An attempt killed by a signal gpupack did not send is judged this long after its end: a
# preemption, `scancel` or a stopped container signals every process of the job at once, and
# gpupack's own signal may come a moment after the experiment's death. Within it, the attempt is
# interrupted; after it, it failed.
KILLED_VERDICT_DELAY_S = 3.0


@dataclass
class Running:
    exp: Experiment
    handle: Handle
    attempt_id: int
    attempt: int
    gpus: tuple[GpuKey, ...]
    budget_bytes: int | None
    started_at: float
    preempt_signal: int = signal.SIGUSR2  # what its `gpupack.job` listens for (gpupack.signals)
    resumed_s: float = 0.0  # wall time of the interrupted attempts it resumes: part of its duration
    peak_bytes: int = 0
    util_sum: float = 0.0
    util_n: int = 0
    node: str = ""  # its (first) node: where a CPU-only experiment's CPUs are
    master_port: int | None = None  # a multi-node experiment's
    killed_at: float | None = None  # time.monotonic() it was seen dead of a signal (KILLED_VERDICT_DELAY_S)


@dataclass
class Engine:
    manifest: Manifest
    store: Store
    probe: GpuProbe
    launcher: Launcher
    inventory: list[GpuInfo]
    options: RunOptions = field(default_factory=RunOptions)
    hooks: Hooks = field(default_factory=Hooks)
    on_tick: Callable[[float], None] = lambda now: None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.by_name = {e.name: e for e in self.manifest.experiments}
        self._index = {e.name: i for i, e in enumerate(self.manifest.experiments)}
        self.states: dict[str, str] = {}
        self.running: dict[str, Running] = {}
        self._launched: list[str] = []  # launched this tick: their leaders' start times are noted next tick
        self.failures: dict[str, int] = {}  # failed attempts in this run (retries are per run)
        self.oom_retries: dict[str, int] = {}
        self.mem_override: dict[str, int] = {}  # budgets raised after a CUDA OOM
        self.signals = StopSignals()
        self.run_id: int | None = None
        self.cuda_ids = {g.key: g.cuda_id for g in self.inventory}
        self.total_bytes = {g.key: g.total_bytes for g in self.inventory}
        self.several_nodes = len({g.node for g in self.inventory}) > 1
        self._last_sample = 0.0
        self._last_compact = 0.0
        self._alloc_end: str | None = None
        self._unavailable: dict[str, str] = {}  # "node:index" -> why it takes nothing new
        self.learned = Learned()
        # The scheduler's environment, read once: os.environ decodes every variable on each read.
        self._base_env = dict(os.environ)
        # The tick's requests, rebuilt only where an estimate or a raised budget changed them.
        self._request_list: list[policy.Request] = []
        self._request_key: tuple[int, int] | None = None
        self._overrides_version = 0
        self._raised: set[str] = set()  # budgets raised since the requests were built
        self._family_versions: dict[str, int] = {}  # family -> learned version they were built at
        self._positions: dict[str, list[int]] = {}  # family -> indices in manifest.experiments
        for i, e in enumerate(self.manifest.experiments):
            self._positions.setdefault(e.template, []).append(i)

    # --- setup ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Sync the manifest into the store, say what is skipped or changed, recover survivors."""
        now = self.clock()
        rows = [_row(e) for e in self.manifest.experiments]
        changes = self.store.sync_experiments(rows)
        self.run_id = self.store.begin_run(
            os.getpid(), socket.gethostname(), self.hooks.job_id, _gpus_text(self.inventory), now
        )
        self.store.set_meta(
            {
                "run_name": self.manifest.name,
                "manifest": str(self.manifest.path),
                "job_id": self.hooks.job_id or "",
                "gpus": _gpus_json(self.inventory),
            }
        )
        changed = [name for name, change in changes.items() if change == "changed"]
        if changed:
            with self.store.batch():  # a changed 10,000-experiment grid: one commit
                for name in changed:
                    self._event("changed", name, f"{name} changed (cmd, env or workdir): it runs again")
        runs_here = getattr(self.launcher, "runs_here", lambda node: True)
        command_is_child = getattr(self.launcher, "command_is_child", True)
        for found in recovery.recover(self.store, self.by_name, now, self.manifest.run_dir, runs_here, command_is_child):
            self._event(found.kind, found.name, found.message)
            exp = self.by_name.get(found.name)
            if found.handle is not None and exp is not None:
                a = found.attempt
                self.running[found.name] = Running(
                    exp, found.handle, a.id, a.number, a.keys, a.budget_bytes, a.started_at,
                    preempt_signal({**self._base_env, **exp.env}),
                    resumed_time_s([p for p in self.store.attempts(exp.name) if p.number < a.number], A_INTERRUPTED),
                    node=a.nodes[0],
                )
        for name, took_s, peak_bytes in self.store.succeeded_runs():
            exp = self.by_name.get(name)
            if exp is not None:
                self.learned.add(exp.template, took_s, peak_bytes)
        # One read: the states after sync and recovery, in manifest order.
        self.states = self.store.experiment_states()
        again: dict[str, tuple[str, str | None]] = {}
        if self.hooks.retry_failed:
            for name, state in self.states.items():
                if state in (FAILED, SKIPPED):
                    again[name] = (PENDING, f"{state} in an earlier run; trying again")
        if again:
            self.store.set_states(again)
            for name in again:
                self.states[name] = PENDING
        done = sum(1 for s in self.states.values() if s == SUCCEEDED)
        interrupted = sum(1 for s in self.states.values() if s == INTERRUPTED)
        nodes = len({g.node for g in self.inventory})
        parts = [f"{len(self.states)} experiments on {len(self.inventory)} GPUs" + (f" of {nodes} nodes" if nodes > 1 else "")]
        if done:
            parts.append(f"{done} already succeeded (skipped)")
        if interrupted:
            parts.append(f"{interrupted} interrupted (they resume)")
        if again:
            parts.append(f"{len(again)} failed or skipped earlier (tried again)")
        self._event("info", None, "run started: " + ", ".join(parts))
        try:
            shutil.copyfile(self.manifest.path, self.manifest.run_dir / "manifest.yaml")
        except OSError as exc:
            self._event("warn", None, f"could not copy the manifest into the run directory: {exc}")

    # --- the loop ---------------------------------------------------------------------------

    def _time_left(self, now: float) -> float | None:
        """Time left in the allocation; its end is kept in the store for the dashboards."""
        left = self.hooks.time_left(now)
        end = "" if left is None else f"{now + left:.0f}"
        if end != self._alloc_end and (not end or not self._alloc_end or abs(float(end) - float(self._alloc_end)) > 30):
            self._alloc_end = end
            self.store.set_meta({"alloc_end": end})
        return left

    def _pending(self) -> bool:
        return any(s in WAITING for s in self.states.values())

    def run(self) -> int:
        idle_ticks = 0
        while True:
            now = self.clock()
            self._reap(now)
            ending = self.launcher.allocation_ending()
            if ending is not None:
                self.signals.stop(f"allocation ending ({ending})")
            self._note_leader_starts()
            # Read after reaping so the memory of what just ended is not counted as used.
            track = getattr(self.probe, "track", None)  # NVML: whose processes are whose
            if track is not None:
                track(str(self.manifest.run_dir), {n: r.attempt for n, r in self.running.items()})
            reading = self.probe.read(self._occupants(now, None))
            self._account(reading, now)
            self._note_unavailable(reading)
            if self.signals.reason is not None:
                return self._shutdown()
            requests = self._requests()
            states = {n: queue_state(s) for n, s in self.states.items()}
            self._mark_doomed(requests, states)
            decision = policy.place(
                requests,
                states,
                reading.gpus,
                list(self._occupants(now, reading).values()),
                now,
                policy.Limits(
                    headroom_bytes=self.options.headroom_bytes,
                    cpus_per_node=self.hooks.cpus_per_node,
                    time_left_s=self._time_left(now),
                ),
            )
            launched = 0
            for placement in decision.placements:
                if not self.launcher.may_launch(time.monotonic()):
                    break  # backpressure (Slurm step creation): the rest waits for a later tick
                self._launch(placement)
                launched += 1
            self.on_tick(now)
            throttled = launched < len(decision.placements)
            if not self.running and not decision.placements:
                # Nothing runs and nothing starts. Live readings can lag the exit of a process
                # (the driver frees memory late), so look again a few times before concluding.
                idle_ticks += 1
                if idle_ticks >= IDLE_TICKS_BEFORE_GIVING_UP or not self._pending():
                    return self._finish(decision)
                self.signals.sleep(min(self.options.poll_s, 1.0))
                continue
            idle_ticks = 0
            # Adopted groups send no SIGCHLD, and a delayed verdict is due: look again soon.
            soon = throttled or any(r.handle.adopted or r.killed_at is not None for r in self.running.values())
            self.signals.sleep(min(self.options.poll_s, 0.5) if soon else self.options.poll_s)

    def _requests(self) -> list[policy.Request]:
        """Every experiment's request, in manifest order; the same list (not to be mutated) while
        nothing changed, else a new one where only the changed families' requests are rebuilt."""
        key = (self.learned.version, self._overrides_version)
        if key == self._request_key:
            return self._request_list
        exps = self.manifest.experiments
        if self._request_key is None:
            requests = [self._request(e) for e in exps]
            self._family_versions = {t: self.learned.family_version(t) for t in self._positions}
        else:
            requests = list(self._request_list)
            stale = {self._index[n] for n in self._raised if n in self._index}
            for template, positions in self._positions.items():
                version = self.learned.family_version(template)
                if self._family_versions[template] != version:
                    self._family_versions[template] = version
                    stale.update(positions)
            for i in stale:
                requests[i] = self._request(exps[i])
        self._raised.clear()
        self._request_list, self._request_key = requests, key
        return requests

    def _request(self, exp: Experiment) -> policy.Request:
        return request_for(exp, self._budget(exp), self.learned.time_s(exp.template, exp.time_s))

    def _budget(self, exp: Experiment) -> int | None:
        """Declared mem, raised to what grid siblings were seen to use and after a CUDA OOM."""
        budget = self.learned.mem_bytes(exp.template, exp.mem_bytes)
        raised = self.mem_override.get(exp.name)
        if raised is not None:
            return raised if budget is None else max(raised, budget)
        return budget

    def _occupants(self, now: float, reading: Reading | None) -> dict[str, Occupant]:
        occupants: dict[str, Occupant] = {}
        for name, r in self.running.items():
            observed = 0
            if reading is not None:
                observed = max(reading.usage.get(name, {}).values(), default=0)
            budget = r.budget_bytes
            if budget is not None and r.peak_bytes > budget:
                budget = r.peak_bytes  # seen using more than declared: budget at the observed peak
            occupants[name] = Occupant(
                name=name,
                gpus=r.gpus,
                budget_bytes=budget,
                exclusive=r.exp.exclusive,
                observed_bytes=observed,
                cpus=r.exp.cpus,
                node=r.node or (self.inventory[0].node if self.inventory else ""),
                expected_end_s=(r.started_at + r.exp.time_s) if r.exp.time_s is not None else None,
                util=r.exp.util,
            )
        return occupants

    def _account(self, reading: Reading, now: float) -> None:
        """Per-experiment peak memory and utilization; GPU samples every sample_every_s."""
        util = {g.key: g.util_percent for g in reading.gpus}
        for name, r in self.running.items():
            used = reading.usage.get(name, {})
            if used:
                peak = max(used.values())
                if r.budget_bytes is not None and peak > r.budget_bytes and r.peak_bytes <= r.budget_bytes:
                    self._event(
                        "warn", name,
                        f"{name} uses {format_bytes(peak)}, above its declared mem {format_bytes(r.budget_bytes)}",
                    )
                r.peak_bytes = max(r.peak_bytes, peak)
            readings = [util[k] for k in r.gpus if util.get(k) is not None]
            if readings:
                r.util_sum += sum(readings) / len(readings)  # type: ignore[arg-type]
                r.util_n += 1
        if now - self._last_sample >= self.options.sample_every_s:
            self._last_sample = now
            self.store.add_gpu_samples(
                now,
                [
                    (g.node, g.index, g.util_percent, None if g.free_bytes is None else g.total_bytes - g.free_bytes, g.total_bytes)
                    for g in reading.gpus
                ],
            )
            if now - self._last_compact >= COMPACT_EVERY_S:
                self._last_compact = now
                self.store.compact(now)  # bounded history over a 24-hour run (store.SAMPLE_TIERS)
            self.store.record_usage(
                {
                    r.attempt_id: (r.peak_bytes or None, (r.util_sum / r.util_n) if r.util_n else None)
                    for r in self.running.values()
                }
            )

    def _note_unavailable(self, reading: Reading) -> None:
        """Say when a GPU becomes unavailable (readings failing, node lost) or comes back, and
        keep the current reasons in the store's meta for the dashboards' GPU rows."""
        now = {f"{g.node}:{g.index}": g.unavailable for g in reading.gpus if g.unavailable}
        if now == self._unavailable:
            return
        # One line per node and reason: a lost node is one event, not one per GPU.
        went: dict[tuple[str, str], list[GpuKey]] = {}
        for key, why in now.items():
            if self._unavailable.get(key) != why:
                node, index = key.rsplit(":", 1)
                went.setdefault((node, why), []).append((node, int(index)))
        for (_, why), keys in went.items():
            self._event("warn", None, f"{self._where(tuple(keys))} unavailable: {why}; no new experiments there")
        back: dict[str, list[GpuKey]] = {}
        for key in sorted(self._unavailable.keys() - now.keys()):
            node, index = key.rsplit(":", 1)
            back.setdefault(node, []).append((node, int(index)))
        for keys in back.values():
            self._event("info", None, f"{self._where(tuple(keys))} available again")
        self._unavailable = now
        self.store.set_meta({UNAVAILABLE_META: json.dumps(now, sort_keys=True)})

    # --- launch and reap ------------------------------------------------------------------

    def _launch(self, placement: policy.Placement) -> None:
        # The attempt's own start time, not the tick's: durations learned from it and its
        # expected end should not include the scheduling work done before it in the tick.
        now = self.clock()
        exp = self.by_name[placement.name]
        keys = placement.keys
        cuda_ids = tuple(self.cuda_ids[(placement.node, i)] for i in placement.gpus)  # the same on each node
        previous = self.store.attempts(exp.name)  # one read for the number and the resume flag
        number = max((a.number for a in previous), default=0) + 1
        resume = bool(previous) and previous[-1].state == A_INTERRUPTED
        resumed_s = resumed_time_s(previous, A_INTERRUPTED)  # they count in its duration
        log_path = exp.out_dir / f"attempt-{number}.log"
        budget = self._budget(exp)
        node_text = ",".join(placement.nodes) or placement.node  # "n1,n2": docs/contract.md "status --json"
        attempt_id = self.store.begin_attempt(
            exp.name, number, self.run_id, node_text, placement.gpus, str(log_path), budget, now
        )
        port = None
        if placement.nodes:
            port = free_port({r.master_port for r in self.running.values() if r.master_port is not None})
        env = experiment_env(
            self._base_env, exp.env, name=exp.name, run_dir=self.manifest.run_dir, out_dir=exp.out_dir,
            attempt=number, resume=resume, cuda_ids=cuda_ids, nodes=placement.nodes, master_port=port,
        )
        spec = LaunchSpec(
            exp.name, number, exp.cmd, exp.workdir, env, log_path, placement.node, placement.gpus, cuda_ids, exp.cpus,
            placement.nodes,
        )
        try:
            handle = self.launcher.launch(spec)  # creates {out} (the log lives there)
        except OSError as exc:
            event = Event(now, "fail", exp.name, f"{exp.name} could not start: {exc}")
            self.store.end_attempt(attempt_id, A_FAILED, None, now, FAILED, f"could not start: {exc}", event=event)
            self.states[exp.name] = FAILED
            return
        extra = ", resuming" if resume else ""
        started = f"{exp.name} started on {self._where(keys)} (attempt {number}{extra})"
        self.store.attempt_launched(attempt_id, handle.pgid, Event(now, "start", exp.name, started), handle.leader_start)
        self.states[exp.name] = RUNNING
        self._launched.append(exp.name)
        self.running[exp.name] = Running(
            exp, handle, attempt_id, number, keys, budget, now, preempt_signal(env), resumed_s,
            node=placement.node, master_port=port,
        )

    def _note_leader_starts(self) -> None:
        """The start times of the groups launched last tick that still run (launch.Handle.note_leader_start)."""
        starts = {}
        for name in self._launched:
            r = self.running.get(name)
            start = r.handle.note_leader_start() if r is not None else None
            if r is not None and start is not None:
                starts[r.attempt_id] = start
        self._launched.clear()
        self.store.set_leader_starts(starts)

    def _reap(self, now: float) -> None:
        done = []
        for r in list(self.running.values()):
            ended, code = r.handle.poll()
            if ended:
                done.append((r, code))
        if done:
            with self.store.batch():  # what ended since the last tick: one commit
                for r, code in done:
                    # Lost with its node or its allocation, or ended once gpupack was told to
                    # stop (the signal that stops gpupack may have ended it too): interrupted, no
                    # retry used, whatever the exit code.
                    lost = self.launcher.lost(r.exp.name, code)
                    stopping = self.signals.reason is not None
                    if lost is None and not stopping and self._verdict_delayed(r, code):
                        continue
                    self._ended(r, code, now, interrupted=lost is not None or stopping, why=lost)

    @staticmethod
    def _verdict_delayed(r: Running, code: int | None) -> bool:
        """Whether the verdict on `r`, which ended with `code`, waits (KILLED_VERDICT_DELAY_S)."""
        if code is not None and 0 <= code < 128:
            return False  # an exit of its own
        if r.killed_at is None:
            r.killed_at = time.monotonic()
        return time.monotonic() - r.killed_at < KILLED_VERDICT_DELAY_S

    def _ended(self, r: Running, code: int | None, now: float, interrupted: bool, why: str | None = None) -> None:
        name, exp = r.exp.name, r.exp
        del self.running[name]
        self.launcher.ended(name)
        usage = (r.peak_bytes or None, (r.util_sum / r.util_n) if r.util_n else None)
        took = format_duration(now - r.started_at)
        where = self._where(r.gpus)
        outcome = judge(code, exp.outputs, exp.workdir, r.handle.log_path)
        if outcome.succeeded and why is None:
            self.learned.add(exp.template, r.resumed_s + now - r.started_at, r.peak_bytes or None)
            event = Event(now, "finish", name, f"{name} succeeded in {took} on {where}")
            self.store.end_attempt(r.attempt_id, A_SUCCEEDED, code, now, SUCCEEDED, event=event, usage=usage)
            self.states[name] = SUCCEEDED
            return
        if interrupted:
            because = f": {why}" if why else ""
            event = Event(now, "interrupt", name, f"{name} interrupted after {took} on {where}{because}")
            self.store.end_attempt(r.attempt_id, A_INTERRUPTED, code, now, INTERRUPTED, why or self.signals.reason, event=event, usage=usage)
            self.states[name] = INTERRUPTED
            return
        log = r.handle.log_path
        if outcome.oom and self.oom_retries.get(name, 0) < MAX_OOM_RETRIES and exp.gpus > 0:
            total = min(self.total_bytes[k] for k in r.gpus)
            raised = oom_budget(r.budget_bytes, r.peak_bytes, total)
            if raised is not None:
                self.oom_retries[name] = self.oom_retries.get(name, 0) + 1
                self.mem_override[name] = raised
                self._raised.add(name)
                self._overrides_version += 1
                event = Event(now, "oom", name, f"{name} ran out of GPU memory after {took} on {where}; retrying with mem {format_bytes(raised)}")
                self.store.end_attempt(r.attempt_id, A_FAILED, code, now, PENDING, "CUDA out of memory; retrying", oom=True, event=event, usage=usage)
                self.states[name] = PENDING
                return
        self.failures[name] = self.failures.get(name, 0) + 1
        if self.failures[name] <= exp.retries:
            why = f"{outcome.reason}; retry {self.failures[name]} of {exp.retries}"
            event = Event(now, "retry", name, f"{name} failed ({outcome.reason}) after {took} on {where}; retry {self.failures[name]} of {exp.retries}")
            self.store.end_attempt(r.attempt_id, A_FAILED, code, now, PENDING, why, oom=outcome.oom, event=event, usage=usage)
            self.states[name] = PENDING
            return
        event = Event(now, "fail", name, f"{name} failed ({outcome.reason}) after {took} on {where}; log: {log}")
        self.store.end_attempt(r.attempt_id, A_FAILED, code, now, FAILED, outcome.reason, oom=outcome.oom, event=event, usage=usage)
        self.states[name] = FAILED

    def _mark_doomed(self, requests: list[policy.Request], states: dict[str, State]) -> None:
        """Skip what can never run (a dependency failed); `states`, the policy's view of this
        tick, is updated too."""
        doomed = policy.doomed(requests, states)
        if not doomed:
            return
        with self.store.batch():  # the skips with their events, in one commit
            self.store.set_states({n: (SKIPPED, why) for n, why in doomed.items()})
            for name, why in doomed.items():
                self._event("skip", name, f"{name} skipped: {why}")
        for name in doomed:
            self.states[name] = SKIPPED
            states[name] = queue_state(SKIPPED)

    # --- the end ------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        """Preempt signal to everyone, wait for the grace period, kill the rest, requeue."""
        now = self.clock()
        signals_at_stop = self.signals.count
        self._event("stop", None, f"stopping: {self.signals.reason}; {len(self.running)} running get the preempt signal")
        # To each command alone (launch.Handle.preempt); one that has not recorded its pid yet
        # (launched a moment ago) is told on a later pass.
        untold = set(self.running)
        # The grace period is measured on the monotonic clock: a wall clock stepped by NTP during
        # it must neither cut it short (no checkpoint) nor stretch it past the allocation's end.
        deadline = time.monotonic() + self.options.grace_s
        while self.running and time.monotonic() < deadline and self.signals.count == signals_at_stop:
            for name in [n for n in untold if n in self.running]:
                r = self.running[name]
                if r.handle.preempt(r.preempt_signal):
                    untold.discard(name)
            for name in list(self.running):
                r = self.running[name]
                ended, code = r.handle.poll()
                if ended:
                    self._ended(r, code, self.clock(), interrupted=True)
            if self.running:
                self.signals.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        for r in list(self.running.values()):
            r.handle.kill()
        for r in list(self.running.values()):
            code = r.handle.wait_killed()
            self._ended(r, code, self.clock(), interrupted=True)
        left = [n for n, s in self.states.items() if s in WAITING]
        if left:
            self._requeue()
        self.on_tick(self.clock())
        return EXIT_STOPPED

    def _requeue(self) -> None:
        """Work is left for a next allocation: the hooks requeue the job (Slurm) and say what they did."""
        done = self.hooks.requeue()
        if done:
            self._event("info", None, done)

    def _finish(self, decision: policy.Decision) -> int:
        now = self.clock()
        waiting = [n for n, s in self.states.items() if s in WAITING]
        if waiting:
            with self.store.batch():  # one commit for thousands left waiting
                for name in waiting:
                    reason = decision.waiting.get(name, "could not be placed")
                    self.store.set_state(name, self.states[name], reason)
                for name in waiting[:20]:
                    self._event("warn", name, f"{name} cannot start: {decision.waiting.get(name, 'could not be placed')}")
            # Nothing runs and nothing can start: the remaining ones wait for time we don't have
            # (the next allocation will have it) or for resources that never free up.
            time_bound = any(decision.why.get(n) is policy.Wait.TIME_LEFT for n in waiting)
            if time_bound:
                self._requeue()
                self.on_tick(now)
                return EXIT_STOPPED
        failed = [n for n, s in self.states.items() if s in (FAILED, SKIPPED)]
        counts = {s: sum(1 for v in self.states.values() if v == s) for s in (SUCCEEDED, FAILED, SKIPPED)}
        self._event(
            "info", None,
            f"run finished: {counts[SUCCEEDED]} succeeded, {counts[FAILED]} failed, {counts[SKIPPED]} skipped"
            + (f", {len(waiting)} could not start" if waiting else ""),
        )
        self.on_tick(now)
        return EXIT_OK if not failed and not waiting else EXIT_FAILED

    def close(self, exit_code: int) -> None:
        if self.run_id is not None:
            try:
                self.store.end_run(self.run_id, exit_code, self.clock())
            except StoreError:
                pass  # the run's end time is cosmetic; the error that stopped us is reported
        self.signals.close()

    def _event(self, kind: str, name: str | None, message: str) -> None:
        self.store.event(kind, name, message, self.clock())

    def _where(self, keys: tuple[GpuKey, ...]) -> str:
        """'gpu0,gpu1' on one node; 'n2:gpu1' among several; 'n1,n2:gpu0-3' across nodes."""
        if not keys:
            return "cpu"
        nodes = list(dict.fromkeys(k[0] for k in keys))
        indices = sorted({k[1] for k in keys})
        if len(nodes) > 1 and indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 2:
            return f"{','.join(nodes)}:gpu{indices[0]}-{indices[-1]}"
        gpus = ",".join(f"gpu{i}" for i in indices)
        return f"{','.join(nodes)}:{gpus}" if self.several_nodes else gpus


def _row(e: Experiment) -> ExperimentRow:
    spec = {
        "gpus": e.gpus, "mem_bytes": e.mem_bytes, "time_s": e.time_s, "cpus": e.cpus,
        "exclusive": e.exclusive, "resumable": e.resumable, "util": e.util, "retries": e.retries,
        **({"nodes": e.nodes} if e.nodes > 1 else {}),  # a one-node row stays as it was: no resync
    }
    return ExperimentRow(e.name, e.phase, e.template, e.order, e.fingerprint, PENDING, None, spec, dict(e.params), True)


def _gpus_text(inventory: list[GpuInfo]) -> str:
    return ",".join(f"{g.node}:{g.index}:{g.total_bytes}" for g in inventory)


def _gpus_json(inventory: list[GpuInfo]) -> str:
    return json.dumps(
        [{"node": g.node, "index": g.index, "total_bytes": g.total_bytes, "name": g.name, "uuid": g.uuid} for g in inventory]
    )
