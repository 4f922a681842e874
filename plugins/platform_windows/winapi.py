"""The thin layer between the Windows adapter and the OS: registry, device I/O, privileges.

Everything the adapter asks of Windows itself (not of netsh/route, which go through the
runner in adapter.py) is a method of one `WinApi` object, so tests replace that object with
a recorder and see every call. `system_api()` gives the real one, built on ctypes and
winreg; those modules are imported only on Windows (behind `sys.platform` checks that mypy
understands), so this module imports, and type-checks, everywhere.

Device I/O is overlapped, because the TAP device is opened with FILE_FLAG_OVERLAPPED and
Windows then requires an OVERLAPPED for every ReadFile, WriteFile and DeviceIoControl. Each
operation keeps its buffer and OVERLAPPED alive until the kernel has finished with them:
a cancelled operation is waited for (briefly) and, if the driver never hands it back, kept
referenced for the life of the process rather than freed under the kernel's feet.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

from ...core.contracts import PlatformError

# CreateFileW arguments.
GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
OPEN_EXISTING = 3
FILE_ATTRIBUTE_SYSTEM = 0x00000004
FILE_FLAG_OVERLAPPED = 0x40000000

# GetLastError() values the adapter tells apart.
ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
ERROR_ACCESS_DENIED = 5
ERROR_GEN_FAILURE = 31
ERROR_SHARING_VIOLATION = 32
ERROR_BUSY = 170
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997
ERROR_NOT_FOUND = 1168

# The lock in a run directory's <ifname>.lock is one byte far past the pid written at the
# start: Windows byte-range locks are mandatory, so locking the pid itself would stop
# another ctun from reading whose lock it is.
LOCK_OFFSET = 1 << 20

# After cancelling an overlapped operation, how long to wait for the driver to give the
# buffer back before abandoning it (keeping it referenced forever instead of freeing it).
CANCEL_GRACE = 0.2


class WinApiError(OSError):
    """A Windows API call failed; `code` is its GetLastError() value."""

    def __init__(self, function: str, code: int, message: str = "") -> None:
        text = message or f"Windows error {code}"
        super().__init__(code, f"{function}: {text}")
        self.function = function
        self.code = code
        self.message = text


class WinApi(Protocol):
    """What the Windows adapter needs from the OS. Handles are plain ints."""

    def is_admin(self) -> bool:
        """shell32.IsUserAnAdmin(): does this process run elevated?"""

    def reg_subkeys(self, path: str) -> list[str]:
        """Names of the subkeys of HKEY_LOCAL_MACHINE\\`path`; [] if it cannot be opened."""

    def reg_value(self, path: str, name: str) -> str | None:
        """The string value `name` of HKEY_LOCAL_MACHINE\\`path`, or None."""

    def create_file(self, path: str, access: int, share: int, disposition: int,
                    flags: int) -> int:
        """CreateFileW(path, access, share, NULL, disposition, flags, NULL); WinApiError."""

    def device_io_control(self, handle: int, code: int, data: bytes, out_size: int) -> bytes:
        """DeviceIoControl with `data` in and up to `out_size` bytes out (overlapped, waited
        for); returns what the driver wrote. WinApiError on failure."""

    def read_file(self, handle: int, size: int, timeout: float) -> bytes | None:
        """An overlapped ReadFile of up to `size` bytes: the data, or None when nothing
        arrived within `timeout` seconds (the read stays pending; the next call collects
        it). WinApiError on failure (ERROR_OPERATION_ABORTED after cancel_io)."""

    def write_file(self, handle: int, data: bytes, timeout: float) -> bool:
        """An overlapped WriteFile of `data`: True once all of it was written, False when it
        did not complete within `timeout` seconds (it is then cancelled). WinApiError when
        the driver refused it."""

    def cancel_io(self, handle: int) -> None:
        """CancelIoEx(handle, NULL): make every pending operation on `handle` complete."""

    def close_handle(self, handle: int) -> None:
        """CloseHandle, after finishing or abandoning what is still pending on `handle`."""

    def lock_file(self, fd: int) -> bool:
        """Take the byte at LOCK_OFFSET of open file `fd` without waiting: False if another
        process holds it. Windows releases it when this process ends, however it ends."""

    def unlock_file(self, fd: int) -> None:
        """Give up lock_file()'s lock."""


def system_api() -> WinApi:
    """The real Windows API (only on Windows)."""
    if sys.platform == "win32":
        return _Kernel32()
    raise PlatformError(f"the Windows platform adapter cannot run on {sys.platform}")


if sys.platform == "win32":
    import contextlib
    import ctypes
    import msvcrt
    import os
    import threading
    import winreg
    from ctypes import wintypes
    from dataclasses import dataclass, field

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    # Private WinDLL objects, not ctypes.windll: setting argtypes on the shared
    # ctypes.windll.kernel32 would change them for every other user in the process.
    _shell32 = ctypes.WinDLL("shell32", use_last_error=True)

    class _OVERLAPPED(ctypes.Structure):
        _fields_ = [
            ("Internal", ctypes.c_size_t),
            ("InternalHigh", ctypes.c_size_t),
            ("Offset", wintypes.DWORD),
            ("OffsetHigh", wintypes.DWORD),
            ("hEvent", wintypes.HANDLE),
        ]

    _LPOVERLAPPED = ctypes.POINTER(_OVERLAPPED)
    _INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value
    _WAIT_OBJECT_0 = 0
    _WAIT_TIMEOUT = 0x102

    def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
        fn = getattr(_kernel32, name)
        fn.restype = restype
        fn.argtypes = list(argtypes)
        return fn

    _CreateFileW = _fn(
        "CreateFileW", wintypes.HANDLE, wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD,
        wintypes.LPVOID, wintypes.DWORD, wintypes.DWORD, wintypes.HANDLE,
    )
    _CreateEventW = _fn(
        "CreateEventW", wintypes.HANDLE, wintypes.LPVOID, wintypes.BOOL, wintypes.BOOL,
        wintypes.LPCWSTR,
    )
    _ResetEvent = _fn("ResetEvent", wintypes.BOOL, wintypes.HANDLE)
    _CloseHandle = _fn("CloseHandle", wintypes.BOOL, wintypes.HANDLE)
    _ReadFile = _fn(
        "ReadFile", wintypes.BOOL, wintypes.HANDLE, wintypes.LPVOID, wintypes.DWORD,
        ctypes.POINTER(wintypes.DWORD), _LPOVERLAPPED,
    )
    _WriteFile = _fn(
        "WriteFile", wintypes.BOOL, wintypes.HANDLE, wintypes.LPVOID, wintypes.DWORD,
        ctypes.POINTER(wintypes.DWORD), _LPOVERLAPPED,
    )
    _DeviceIoControl = _fn(
        "DeviceIoControl", wintypes.BOOL, wintypes.HANDLE, wintypes.DWORD, wintypes.LPVOID,
        wintypes.DWORD, wintypes.LPVOID, wintypes.DWORD, ctypes.POINTER(wintypes.DWORD),
        _LPOVERLAPPED,
    )
    _GetOverlappedResult = _fn(
        "GetOverlappedResult", wintypes.BOOL, wintypes.HANDLE, _LPOVERLAPPED,
        ctypes.POINTER(wintypes.DWORD), wintypes.BOOL,
    )
    _WaitForSingleObject = _fn(
        "WaitForSingleObject", wintypes.DWORD, wintypes.HANDLE, wintypes.DWORD
    )
    _CancelIoEx = _fn("CancelIoEx", wintypes.BOOL, wintypes.HANDLE, _LPOVERLAPPED)

    def _error(function: str, code: int | None = None) -> WinApiError:
        if code is None:
            code = ctypes.get_last_error()
        return WinApiError(function, code, ctypes.FormatError(code).strip())

    def _millis(seconds: float) -> int:
        return max(0, min(int(seconds * 1000), 0xFFFFFFFE))  # 0xFFFFFFFF is INFINITE

    # Operations the driver never handed back: referenced here so their memory is never
    # freed while the kernel may still write into it.
    _abandoned: list[_Op] = []

    class _Op:
        """One overlapped operation's OVERLAPPED, event and buffer."""

        def __init__(self, size: int) -> None:
            self.size = max(size, 1)
            self.buffer = ctypes.create_string_buffer(self.size)
            self.overlapped = _OVERLAPPED()
            event = _CreateEventW(None, True, False, None)  # manual reset, not signalled
            if not event:
                raise _error("CreateEventW")
            self.event: int = event
            self.pending = False

        def reset(self) -> None:
            """Ready for the next operation: a zeroed OVERLAPPED, the event unsignalled."""
            ctypes.memset(ctypes.byref(self.overlapped), 0, ctypes.sizeof(self.overlapped))
            self.overlapped.hEvent = self.event
            if not _ResetEvent(self.event):
                raise _error("ResetEvent")

        def started(self, ok: int, function: str) -> None:
            """After ReadFile/WriteFile/DeviceIoControl returned `ok`."""
            if not ok:
                code = ctypes.get_last_error()
                if code != ERROR_IO_PENDING:
                    raise _error(function, code)
            self.pending = True

        def wait(self, seconds: float) -> bool:
            result = _WaitForSingleObject(self.event, _millis(seconds))
            if result == _WAIT_TIMEOUT:
                return False
            if result != _WAIT_OBJECT_0:
                raise _error("WaitForSingleObject")
            return True

        def result(self, handle: int, function: str) -> int:
            """Bytes transferred by the completed operation (its event is signalled)."""
            done = wintypes.DWORD(0)
            self.pending = False
            if not _GetOverlappedResult(handle, ctypes.byref(self.overlapped),
                                        ctypes.byref(done), False):
                raise _error(function)
            return int(done.value)

        def cancel(self, handle: int) -> int | None:
            """Cancel it and wait for the driver to give it back: the bytes it transferred
            after all (-1 if it failed or was cancelled), or None when the driver kept it,
            which abandons it."""
            if not self.pending:
                return -1
            _CancelIoEx(handle, ctypes.byref(self.overlapped))
            if not self.wait(CANCEL_GRACE):
                _abandoned.append(self)
                return None
            try:
                return self.result(handle, "cancelled operation")
            except WinApiError:  # ERROR_OPERATION_ABORTED, as a rule
                return -1

        def close(self) -> None:
            if not self.pending:
                _CloseHandle(self.event)

    @dataclass
    class _HandleState:
        read: _Op | None = None
        write: _Op | None = None
        write_lock: threading.Lock = field(default_factory=threading.Lock)

    class _Kernel32:
        """WinApi on kernel32, shell32, winreg and msvcrt."""

        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._handles: dict[int, _HandleState] = {}

        def _state(self, handle: int) -> _HandleState:
            with self._lock:
                return self._handles.setdefault(handle, _HandleState())

        # -- privileges and registry ------------------------------------------------------

        def is_admin(self) -> bool:
            return bool(_shell32.IsUserAnAdmin())

        def reg_subkeys(self, path: str) -> list[str]:
            try:
                key = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path, 0, winreg.KEY_READ)
            except OSError:
                return []
            names: list[str] = []
            with key:
                while True:
                    try:
                        names.append(winreg.EnumKey(key, len(names)))
                    except OSError:  # ERROR_NO_MORE_ITEMS
                        return names

        def reg_value(self, path: str, name: str) -> str | None:
            try:
                with winreg.OpenKey(
                    winreg.HKEY_LOCAL_MACHINE, path, 0, winreg.KEY_READ
                ) as key:
                    value, _kind = winreg.QueryValueEx(key, name)
            except OSError:  # missing, or access denied (the class key's "Properties")
                return None
            return value if isinstance(value, str) else None

        # -- device I/O -------------------------------------------------------------------

        def create_file(self, path: str, access: int, share: int, disposition: int,
                        flags: int) -> int:
            handle = _CreateFileW(path, access, share, None, disposition, flags, None)
            if handle is None or handle == _INVALID_HANDLE_VALUE:
                raise _error("CreateFileW")
            return int(handle)

        def device_io_control(self, handle: int, code: int, data: bytes,
                              out_size: int) -> bytes:
            op = _Op(1)
            try:
                op.reset()
                inbuf = ctypes.create_string_buffer(data, len(data)) if data else None
                outbuf = ctypes.create_string_buffer(out_size) if out_size else None
                ok = _DeviceIoControl(handle, code, inbuf, len(data), outbuf, out_size, None,
                                      ctypes.byref(op.overlapped))
                op.started(ok, "DeviceIoControl")
                done = wintypes.DWORD(0)
                # The TAP driver completes its control codes at once: wait=TRUE is safe.
                finished = _GetOverlappedResult(handle, ctypes.byref(op.overlapped),
                                                ctypes.byref(done), True)
                op.pending = False
                if not finished:
                    raise _error("DeviceIoControl")
                return outbuf.raw[: done.value] if outbuf is not None else b""
            finally:
                op.close()

        def read_file(self, handle: int, size: int, timeout: float) -> bytes | None:
            state = self._state(handle)
            op = state.read
            if op is None or (not op.pending and op.size < size):
                if op is not None:
                    op.close()
                op = state.read = _Op(size)
            if not op.pending:
                op.reset()
                ok = _ReadFile(handle, op.buffer, size, None, ctypes.byref(op.overlapped))
                op.started(ok, "ReadFile")
            if not op.wait(timeout):
                return None
            count = op.result(handle, "ReadFile")
            return op.buffer.raw[:count]

        def write_file(self, handle: int, data: bytes, timeout: float) -> bool:
            state = self._state(handle)
            with state.write_lock:
                op = state.write
                if op is None or op.size < len(data):
                    if op is not None:
                        op.close()
                    op = state.write = _Op(max(len(data), 2048))
                op.reset()
                ctypes.memmove(op.buffer, data, len(data))
                ok = _WriteFile(handle, op.buffer, len(data), None, ctypes.byref(op.overlapped))
                op.started(ok, "WriteFile")
                if op.wait(timeout):
                    return op.result(handle, "WriteFile") == len(data)
                written = op.cancel(handle)
                if written is None:
                    state.write = None  # abandoned: the next write gets a fresh buffer
                return written == len(data)

        def cancel_io(self, handle: int) -> None:
            if not _CancelIoEx(handle, None):
                code = ctypes.get_last_error()
                if code != ERROR_NOT_FOUND:  # nothing was pending
                    raise _error("CancelIoEx", code)

        def close_handle(self, handle: int) -> None:
            with self._lock:
                state = self._handles.pop(handle, None)
            if state is not None:
                for op in (state.read, state.write):
                    if op is not None:
                        op.cancel(handle)
                        op.close()
            if not _CloseHandle(handle):
                raise _error("CloseHandle")

        # -- the run directory's lock -----------------------------------------------------

        def lock_file(self, fd: int) -> bool:
            os.lseek(fd, LOCK_OFFSET, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError:
                return False
            return True

        def unlock_file(self, fd: int) -> None:
            os.lseek(fd, LOCK_OFFSET, os.SEEK_SET)
            with contextlib.suppress(OSError):  # closing the file releases it anyway
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
