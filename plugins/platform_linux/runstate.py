"""Who owns an interface name, and what a run changed, so a crashed run can be undone.

`<run_dir>/<ifname>.lock` is flock()ed for as long as an adapter owns `ifname`; the kernel
drops the lock when the process dies, so holding it proves no live ctun uses the name.
`<run_dir>/<ifname>.json` records what the owner changed; finding one while holding the
lock means the previous owner crashed before undoing it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from ...core.contracts import PlatformError
from ...core.crash_record import CrashRecord

RUN_DIR_ENV = "CTUN_RUN_DIR"
DEFAULT_RUN_DIR = "/run/ctun"


def default_run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def _fs_error(action: str, path: Path, exc: OSError) -> PlatformError:
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"; run ctun as root, or set {RUN_DIR_ENV} to a writable directory"
    return PlatformError(f"cannot {action} {path}: {exc.strerror or exc}{hint}")


class RunState(CrashRecord):
    """The lock on one interface name plus its state file; release() gives the name up."""

    def _fs_error(self, action: str, path: Path, exc: OSError) -> PlatformError:
        return _fs_error(action, path, exc)

    def __init__(self, run_dir: Path, ifname: str, lock_fd: int) -> None:
        self.run_dir = run_dir
        self.ifname = ifname
        self._lock_fd = lock_fd

    @property
    def lock_path(self) -> Path:
        return self.run_dir / f"{self.ifname}.lock"

    @property
    def state_path(self) -> Path:
        return self.run_dir / f"{self.ifname}.json"

    @classmethod
    def acquire(cls, run_dir: Path, ifname: str) -> RunState:
        """Take the name, or raise PlatformError naming the live process that has it."""
        try:
            if not run_dir.is_dir():
                run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
                run_dir.chmod(0o755)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise _fs_error("create", run_dir, exc) from exc
        path = run_dir / f"{ifname}.lock"
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise _fs_error("open", path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise PlatformError(
                    f"interface {ifname} is in use by another running ctun (pid {pid}); "
                    "stop it or pick another interface name"
                ) from None
            except OSError:
                os.close(fd)
                raise
            # The previous owner unlinks the file while still holding the lock, so a lock
            # won on an inode that is no longer at `path` is worthless: start over.
            if _same_file(fd, path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(run_dir, ifname, fd)

    def release(self) -> None:
        if self._lock_fd < 0:
            return
        # Unlink before unlocking: see the inode check in acquire().
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = -1


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    # The holder writes its pid right after locking; it may not have yet.
    return text if text.isdigit() else "unknown"
