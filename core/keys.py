"""Pre-shared tunnel keys: their text form, and the key files that hold them.

A key is 32 random bytes; on disk and in the environment it is one line of standard base64
(44 characters). Key files must be private to their owner, like ssh private keys: a key that
other local users can read is not a secret any more, so we refuse it rather than warn.

ConfigError lives here rather than in config.py because config.py builds on this module;
callers should import everything from ctun.core.config, which re-exports it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
from pathlib import Path

KEY_BYTES = 32
KEY_TEXT_LENGTH = 44  # len(base64 of 32 bytes), padding included
# A key file is one short line; reading more than this only happens for the wrong file.
_READ_LIMIT = 4096

# Characters str.splitlines() breaks on; any of them would split a ConfigError over lines.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_ESCAPE_LINE_BREAKS = {ord(c): c.encode("unicode_escape").decode("ascii") for c in _LINE_BREAKS}


class ConfigError(Exception):
    """Bad configuration or key material; str() is ONE line naming the file (if any), the key
    or flag, the bad value and what to do about it."""

    def __init__(self, message: str) -> None:
        # Messages quote user input (paths, TOML strings, flag values); escaping line breaks
        # here keeps the one-line promise whatever that input holds.
        super().__init__(message.translate(_ESCAPE_LINE_BREAKS))


def encode_key(key: bytes) -> str:
    """The one-line text form of a key, as key files and CTUN_KEY hold it."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes, not {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str, origin: str, fix: str) -> bytes:
    """Parse the text form of a key. Errors start with `origin` (a file, a TOML key or an
    environment variable) and end with `fix`; they never quote the text, which may be a
    nearly right secret."""
    text = text.strip()  # the trailing newline of a key file, stray spaces around CTUN_KEY
    if not text:
        raise ConfigError(f"{origin}: empty, expected a base64 key; {fix}")
    if len(text) != KEY_TEXT_LENGTH:
        raise ConfigError(
            f"{origin}: not a key (expected {KEY_TEXT_LENGTH} base64 characters, "
            f"got {len(text)}); {fix}"
        )
    try:
        key = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ConfigError(f"{origin}: not a key (not valid base64); {fix}") from None
    if len(key) != KEY_BYTES:  # 44 characters with extra padding decode to fewer bytes
        raise ConfigError(
            f"{origin}: not a key (decodes to {len(key)} bytes, expected {KEY_BYTES}); {fix}"
        )
    return key


def read_key(path: Path) -> bytes:
    """The key in `path`; never creates it. Any problem is a ConfigError saying what to do."""
    key = _read_key(path, _FIX_READ)
    if key is None:
        raise ConfigError(
            f"{path}: key file not found; check the path, or copy the host's key there "
            f"(the host keeps it in vm.key in its state directory)"
        )
    return key


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, first creating it (mode 0600, new directories 0700) if missing."""
    key = _read_key(path, _FIX_CREATED)
    if key is not None:
        return key
    # Only a missing file is ours to fix: an existing bad one is the user's to decide,
    # as someone may already have copied it, so we never overwrite it.
    key = secrets.token_bytes(KEY_BYTES)
    _make_private_dirs(path.parent)
    if not _create_exclusive(path, (encode_key(key) + "\n").encode("ascii")):
        # Another ctun created it between our read and our write: use theirs.
        return read_key(path)
    return key


_FIX_READ = "write the right key into it (one line of base64, like the host's vm.key)"
_FIX_CREATED = "fix or delete it (ctun then makes a new key, which the VM side must get too)"


def _read_key(path: Path, fix: str) -> bytes | None:
    """The key in `path`, or None when there is no such file."""
    try:
        # O_NONBLOCK: a FIFO at the key path must fail the regular-file check below, not hang.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        raise ConfigError(f"{path}: cannot open key file: {os_reason(exc)}") from None
    try:
        # fstat the descriptor we read, not the path, so a swap in between cannot fool us.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file; point the key file setting at a file")
        _check_private(path, st.st_mode)
        data = os.read(fd, _READ_LIMIT)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file: {os_reason(exc)}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a key (binary data); {fix}") from None
    if len(text.strip().splitlines()) > 1:
        raise ConfigError(f"{path}: not a key (more than one line); {fix}")
    return decode_key(text, str(path), fix)


def _check_private(path: Path, mode: int) -> None:
    # Windows has no POSIX permission bits (st_mode always looks world-readable there);
    # its ACLs are out of scope, so the check would only ever reject good files.
    if os.name == "nt":
        return
    if mode & 0o077:
        raise ConfigError(
            f"{path}: key file is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and missing parents as 0700; leave existing ones alone (the key
    may well live in /tmp or a home directory, which are not ours to chmod)."""
    missing: list[Path] = []
    for d in (directory, *directory.parents):
        if os.path.isdir(d):
            break
        missing.append(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
            # mkdir's mode is filtered through the umask, which could leave us locked out.
            os.chmod(d, 0o700)
        except FileExistsError:
            continue  # made concurrently, or not a directory: the write below will tell
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{d}: cannot create key directory: {os_reason(exc)}") from None


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write `data` to a new file at `path`, 0600; False if `path` exists already.

    The data goes to a temporary file first and is hard-linked into place, so nobody ever
    sees a half-written key, and a crash cannot leave an empty key file behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # Some filesystems (FAT, some network mounts) have no hard links: fall back to
            # creating the file in place, still exclusively.
            try:
                _write_new(path, data)
            except FileExistsError:
                return False
        return True
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot create key file: {os_reason(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_new(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):  # the umask may have narrowed 0600 to something unreadable
            os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def os_reason(exc: BaseException) -> str:
    """What went wrong, for a one-line message: "Permission denied" rather than OSError's
    "[Errno 13] Permission denied: 'path'" (the caller names the path itself)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
