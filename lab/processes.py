"""The processes a lab runs in its namespaces, and the temp dir they run in (see Lab, DockerLab).

A lab's workdir is a temp dir `<stem>XXXXXXXX` (the stem names the lab: `<prefix>.lab.`), with
run/ and state/, which its processes get as CTUN_RUN_DIR and CTUN_STATE_DIR, and one
`<name>.log` per process. Cleanup removes every dir with the stem, whoever made it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Send `sig`, escalate to SIGKILL if the process outlives `timeout`; return the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    assert proc.returncode is not None
    return proc.returncode


def pid_alive(pid: int) -> bool:
    """True while `pid` runs. A zombie counts as gone: it holds no namespace or socket, and an
    orphan's zombie may never be reaped when PID 1 is not a real init (as in containers)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may itself contain ") ".
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def namespace_pids(name: str) -> list[int]:
    """The processes in network namespace `name`, whoever started them."""
    result = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    )
    return [int(tok) for tok in result.stdout.split() if tok.isdigit()]


def kill_all(pids: set[int], timeout: float) -> None:
    """SIGTERM every pid, then SIGKILL whatever is still alive at the deadline."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = {p for p in pids if pid_alive(p)}
        if not pids:
            return
    raise RuntimeError(f"processes survived SIGKILL: {sorted(pids)}")


# ---- the workdir


def placeholder_workdir(stem: str) -> Path:
    """Where a lab's workdir points until create() makes it (never created itself)."""
    return Path(tempfile.gettempdir()) / f"{stem}unset"


def make_workdir(stem: str) -> Path:
    """A fresh temp dir `<stem>XXXXXXXX` with an empty run/ and state/."""
    workdir = Path(tempfile.mkdtemp(prefix=stem))
    run_dir(workdir).mkdir()
    state_dir(workdir).mkdir()
    return workdir


def remove_workdirs(stem: str) -> None:
    """Remove every temp dir `<stem>*`: a lab's own, and any a crashed lab left."""
    for path in Path(tempfile.gettempdir()).glob(f"{stem}*"):
        shutil.rmtree(path, ignore_errors=True)


def run_dir(workdir: Path) -> Path:
    return workdir / "run"


def state_dir(workdir: Path) -> Path:
    return workdir / "state"


def read_log(workdir: Path, name: str) -> str:
    """What process `name` has written to its log in `workdir` ("" if it never started)."""
    try:
        return (workdir / f"{name}.log").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


# ---- the processes


class Processes:
    """The processes a lab started, and the log files they write to."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def spawn(
        self,
        workdir: Path,
        ns: str,
        argv: list[str],
        name: str,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run argv inside `ns`, output to workdir/<name>.log (replacing an older one), with
        the workdir's run/ and state/ as CTUN_RUN_DIR and CTUN_STATE_DIR; `env` on top.
        `stdin`: what the process reads from standard input (then end of file)."""
        full_env = dict(os.environ)
        full_env.update(
            CTUN_RUN_DIR=str(run_dir(workdir)),
            CTUN_STATE_DIR=str(state_dir(workdir)),
            # Tests read logs while the process runs; block-buffered output would lag.
            PYTHONUNBUFFERED="1",
        )
        if env:
            full_env.update(env)
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed by kill()
        self._logs.append(log)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            # Own session: a Ctrl-C at the terminal then reaches only pytest, whose teardown
            # stops the lab in order, rather than every daemon and agent at the same instant.
            start_new_session=True,
        )
        self._procs.append(proc)
        if proc.stdin is not None:
            with proc.stdin:  # a few bytes: the pipe's buffer takes them without blocking
                proc.stdin.write(stdin or b"")
        return proc

    def kill(self, namespaces: Iterable[str], timeout: float) -> list[str]:
        """Stop every process in `namespaces` and each of ours still running: SIGTERM, then
        SIGKILL after `timeout`. Reaps ours and closes all logs whatever happens; returns the
        errors (processes that survived SIGKILL), for the caller to report with the rest."""
        errors: list[str] = []
        pids = {p.pid for p in self._procs if p.poll() is None}
        for name in namespaces:
            pids.update(namespace_pids(name))
        pids.discard(os.getpid())
        try:
            kill_all(pids, timeout)
        except RuntimeError as exc:  # e.g. stuck in uninterruptible sleep: clean up the rest
            errors.append(str(exc))
        # poll() reaps our dead children; keep only one that survived SIGKILL, if any.
        self._procs = [p for p in self._procs if p.poll() is None]
        for log in self._logs:
            log.close()
        self._logs.clear()
        return errors
