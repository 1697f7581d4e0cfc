"""Starting, signalling and reaping experiments: LocalLauncher (a setsid subprocess), and what
every launcher shares (srun.py's SrunLauncher, a Slurm job step, runs its local `srun` client the
same way). Nothing here knows Slurm: the Slurm side depends on this module, never the reverse.

Every attempt runs in its own session, so its whole process tree is one process group that
gpupack kills as a unit after the grace period (children that outlive their parent included).
A small POSIX sh wrapper leads the group (sh starts in half the time of bash; the command itself
runs in bash): it traps the stop signals so that it outlives stray ones, and records the
command's exit status in `.attempt-<n>.exit`, so a scheduler that was dead when the experiment
finished still learns the real outcome.

The preempt signal goes to the command alone, never to the group: a trainer's DataLoader workers
or ranks have no handler for it and would die before the trainer checkpoints. Locally the command
(`bash -c CMD`, which execs a simple CMD) is the wrapper's one child, so gpupack finds its pid in
/proc when it has a signal to send, and launching costs no process more than the command itself.
Inside a job step slurmstepd starts it, so there it is started by `sh -c 'echo $$ >
.attempt-<n>.cmd; exec bash -c CMD'`, which records its pid. gpupack signals that pid when the
command runs on this machine (checked by its start-up identity in /proc), and otherwise signals
the local srun client, which has Slurm deliver it to the step's task (with proctrack/cgroup, the
task alone).

A multi-node experiment (LaunchSpec.nodes) is one attempt too. Locally (simulated nodes) its K
ranks run inside the one wrapper and process group, under ranks.py in the command's place (it
passes the preempt signal on to every rank; one exit status: the first non-zero one of a rank,
else 0), with MASTER_ADDR=127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from . import procs, ranks
from .procs import Identity

# $1 = exit file, the rest = the command. The trap keeps the wrapper alive through the preempt
# signal so that it can record the command's status; `:` traps are not inherited by the command.
# The status is written in place (no temporary file and `mv`, one process fewer per attempt):
# it is read only once the wrapper is gone, when the write is either whole or never happened.
_WRAPPER = 'trap : USR1 USR2 TERM INT HUP; exit_file=$1; shift; "$@"; rc=$?; printf "%s\\n" "$rc" > "$exit_file"; exit "$rc"'
# Inside a job step: $0 = the command's pid file, the rest = `bash -c CMD`: the pid recorded is
# the command's own, since exec keeps it (and bash execs a simple CMD in turn).
_COMMAND = 'echo $$ > "$0"; exec "$@"'


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    attempt: int
    cmd: str  # run by bash -c
    workdir: Path
    env: Mapping[str, str]  # full environment of the experiment (gpupack variables included)
    log_path: Path
    node: str = ""
    gpu_indices: tuple[int, ...] = ()
    cuda_ids: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES tokens of those GPUs
    cpus: int = 1
    # A multi-node experiment: its nodes in rank order (node == nodes[0]), the same GPUs on
    # each; empty for a one-node one. The launcher sets the per-rank variables.
    nodes: tuple[str, ...] = ()


@dataclass
class Handle:
    """A launched attempt. `popen` is None for a survivor adopted after a scheduler restart.

    A process-group id is trusted only together with its leader's start time (`leader_start`,
    from /proc): after the group is gone its number may be reused by someone else's group, which
    gpupack must neither wait for nor kill."""

    name: str
    pgid: int
    exit_file: Path
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = field(default_factory=time.time)
    leader_start: int | None = None
    identity: Identity | None = None  # the attempt's GPUPACK_* identity, to recognise its command
    local: bool = True  # the command runs on this machine (its pid means something here)
    # The command is the wrapper's one child (LocalLauncher), rather than a job step's task that
    # records its pid in the .cmd file.
    command_is_child: bool = False

    def poll(self) -> tuple[bool, int | None]:
        """(ended, exit code). An adopted group that vanished without an exit file has ended
        with an unknown code (None).

        When our wrapper has exited, whatever it left behind in its group (a forked child that
        outlived the experiment, still holding GPU memory) is killed before the wrapper is
        reaped: until then its pid, which is the group's id, cannot be reused."""
        if self.popen is not None:
            if self.popen.returncode is None:
                try:
                    if os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                        return False, None
                    _killpg(self.pgid, signal.SIGKILL)
                except ChildProcessError:
                    pass  # already reaped: the group id may be reused, so no kill
            code = self.popen.wait()
            return True, (128 - code) if code < 0 else code
        if self.group_is_ours():
            return False, None
        return True, read_int_file(self.exit_file)

    def note_leader_start(self) -> int | None:
        """The group leader's start time, read once the launch is over (LocalLauncher.launch); kept
        in the store for a scheduler that adopts the attempt after a restart."""
        if self.leader_start is None and self.popen is not None:
            self.leader_start = procs.start_time(self.pgid)  # unreaped: the pid is still this one
        return self.leader_start

    @property
    def adopted(self) -> bool:
        """A survivor of an earlier scheduler: no child of ours, so no SIGCHLD when it ends
        (the loop polls it sooner)."""
        return self.popen is None

    def wait_killed(self, timeout_s: float = 10.0) -> int | None:
        """After SIGKILL the group is gone within milliseconds; collect the wrapper's status."""
        if self.popen is not None:
            try:
                code = self.popen.wait(timeout_s)
                return (128 - code) if code < 0 else code
            except Exception:  # a process stuck in the kernel: give up on its status, not the run
                return None
        return self.poll()[1]

    def group_is_ours(self) -> bool:
        """The group still runs and is this attempt's. A live leader must be the very process
        that was recorded; with the leader gone, members alive keep the number reserved (Linux
        does not reuse a pid that names a live group), so they are ours."""
        if not group_alive(self.pgid):
            return False
        now = procs.start_time(self.pgid)
        return now is None or self.leader_start is None or now == self.leader_start

    def preempt(self, sig: int) -> bool:
        """Send the preempt signal to the command (never to its children); False when it cannot
        be delivered yet (the command has not recorded its pid): call again."""
        if self.local:
            pid = self._command_pid()
            if pid is None:  # not started yet (call again), or nothing runs any more: nothing to tell
                return not self.group_is_ours()
            if self.identity is not None and procs.identity(pid) != self.identity:
                return True  # the command has exited (its pid may already be someone else's)
            for target in procs.command_targets(pid):
                _kill(target, sig)
            return True
        # The command runs on another node: the local srun client passes the signal to its step.
        if self.popen is None and not self.group_is_ours():
            return True
        clients = [c for c in procs.children(self.pgid) if os.path.basename((procs.cmdline(c) or [""])[0]) == "srun"]
        for client in clients:
            _kill(client, sig)
        return bool(clients) or not group_alive(self.pgid)

    def _command_pid(self) -> int | None:
        """The command's pid as a job step's command recorded it, else the wrapper's one child."""
        pid = read_int_file(cmd_file_for(self.log_path))
        if pid is not None or not self.command_is_child or not self.group_is_ours():
            return pid
        kids = procs.children(self.pgid)
        return kids[0] if len(kids) == 1 else None  # none: not forked yet, or the command has ended

    def kill(self) -> None:
        """SIGKILL to the whole group, unless it is no longer this attempt's."""
        if self.popen is not None or self.group_is_ours():
            _killpg(self.pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # it just exited


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader that we have not reaped still "exists"; it is not running.
    return not _only_zombies(pgid)


def _only_zombies(pgid: int) -> bool:
    # Leader gone (None) but others in the group alive: not only zombies.
    return procs.state(pgid) == b"Z"


def read_int_file(path: Path) -> int | None:
    """The number in a wrapper's .exit or .pid file; None if absent or torn."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def exit_file_for(log_path: Path) -> Path:
    """exp/<name>/attempt-3.log -> exp/<name>/.attempt-3.exit (a job step's: also .attempt-3.cmd)."""
    return log_path.with_name(f".{log_path.stem}.exit")


def cmd_file_for(log_path: Path) -> Path:
    """The pid of a job step's command (its task), as the command wrote it (command_argv)."""
    return log_path.with_name(f".{log_path.stem}.cmd")


class Launcher(Protocol):
    def launch(self, spec: LaunchSpec) -> Handle: ...

    def may_launch(self, now: float) -> bool: ...  # now: time.monotonic()

    def lost(self, name: str, code: int | None) -> str | None: ...

    def allocation_ending(self) -> str | None: ...

    def ended(self, name: str) -> None: ...


class LocalLauncher:
    """Each attempt is `bash -c CMD` in a new session on this machine."""

    kind = "local"
    command_is_child = True  # see Handle.command_is_child

    def runs_here(self, node: str) -> bool:
        return True

    def command_here(self, spec: LaunchSpec) -> bool:
        """The attempt's one command process runs on this machine: its recorded pid is to be
        signalled here (simulated nodes too: ranks.py is that one command)."""
        return self.runs_here(spec.node)

    def may_launch(self, now: float) -> bool:
        return True

    def lost(self, name: str, code: int | None) -> str | None:
        """Why the attempt `name`, which has just ended with `code`, was lost with its node or
        its allocation (None: it ran its course). Such an attempt is interrupted, whatever its
        exit code."""
        return None

    def allocation_ending(self) -> str | None:
        """Why the allocation is ending, learnt from an attempt that `lost()` judged (a preempted
        Slurm job's steps are killed before gpupack gets any signal); None as far as known."""
        return None

    def ended(self, name: str) -> None:
        pass

    def argv(self, spec: LaunchSpec) -> list[str]:
        """The command, which the wrapper starts as its one child."""
        if spec.nodes:  # simulated nodes: the K ranks side by side on this machine (ranks.py)
            return [sys.executable, "-I", ranks.__file__, spec.cmd, *spec.nodes]
        return ["bash", "-c", spec.cmd]

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        env = dict(spec.env)
        if spec.nodes:
            env["MASTER_ADDR"] = "127.0.0.1"  # every simulated node is this machine
        return env

    def launch(self, spec: LaunchSpec) -> Handle:
        """Start the attempt. The leader's start time is left for Handle.note_leader_start: read now,
        while the wrapper is still being exec'd, /proc would stall the loop for as long."""
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        exit_file = exit_file_for(spec.log_path)
        exit_file.unlink(missing_ok=True)
        cmd_file_for(spec.log_path).unlink(missing_ok=True)
        log = open(spec.log_path, "ab", buffering=0)
        try:
            _write_header(log, spec)
            popen = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, "gpupack-wrap", str(exit_file), *self.argv(spec)],
                cwd=spec.workdir,
                env=self.environment(spec),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session + process group: signalled and killed as one
                close_fds=True,
            )
        finally:
            log.close()
        return Handle(
            spec.name, popen.pid, exit_file, spec.log_path, popen, identity=Identity.of_env(spec.env),
            local=self.command_here(spec), command_is_child=self.command_is_child,
        )


def command_argv(spec: LaunchSpec) -> list[str]:
    """A job step's `bash -c CMD`, behind the few bytes of sh that record the command's pid (_COMMAND)."""
    return ["/bin/sh", "-c", _COMMAND, str(cmd_file_for(spec.log_path)), "bash", "-c", spec.cmd]


def _write_header(log: IO[bytes], spec: LaunchSpec) -> None:
    gpus = ",".join(spec.cuda_ids) if spec.cuda_ids else "none"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    where = ",".join(spec.nodes) or spec.node or "local"
    log.write(f"# gpupack: {spec.name} attempt {spec.attempt} started {stamp} on {where} gpus={gpus}\n".encode())


def experiment_env(
    base: Mapping[str, str],
    extra: Mapping[str, str],
    *,
    name: str,
    run_dir: Path,
    out_dir: Path,
    attempt: int,
    resume: bool,
    cuda_ids: Sequence[str],
    nodes: Sequence[str] = (),
    master_port: int | None = None,
) -> dict[str, str]:
    """README "What an experiment sees". For a multi-node experiment (`nodes`, in rank order) the
    variables all ranks share; the launcher adds MASTER_ADDR and each rank's RANK, NODE_RANK and
    GPUPACK_NODE_RANK."""
    env = dict(base)
    env.update(extra)
    visible = ",".join(cuda_ids)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": visible,  # empty for CPU-only experiments: they see no GPU
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "GPUPACK_RUN_DIR": str(run_dir),
            "GPUPACK_EXPERIMENT": name,
            "GPUPACK_OUT": str(out_dir),
            "GPUPACK_ATTEMPT": str(attempt),
        }
    )
    if resume:
        env["GPUPACK_RESUME"] = "1"
    else:
        env.pop("GPUPACK_RESUME", None)
    if nodes:
        k = str(len(nodes))
        env.update({"WORLD_SIZE": k, "GPUPACK_NNODES": k, "GPUPACK_NODES": ",".join(nodes)})
        if master_port is not None:
            env["MASTER_PORT"] = str(master_port)
    return env


def free_port(taken: Collection[int] = ()) -> int:
    """A TCP port free on this machine now and not in `taken` (ports given to experiments that
    have not bound them yet): the kernel's choice of an ephemeral port, which on the nodes of one
    cluster is as likely free on the first node of a multi-node step as here."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port
