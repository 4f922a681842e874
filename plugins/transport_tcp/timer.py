"""A one-shot monotonic timer as a file descriptor (Linux timerfd, through ctypes).

The TCP transport must close expired connections even when no byte arrives, yet the engine
calls receive() only when the transport's fd polls readable. Registering a timerfd in the
transport's epoll makes that fd readable at the next deadline, without a helper thread.
os.timerfd_create only arrived in Python 3.13, hence ctypes.
"""

from __future__ import annotations

import ctypes
import math
import os

CLOCK_MONOTONIC = 1  # the clock time.monotonic() reads on Linux, so deadlines compare directly
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_create.restype = ctypes.c_int
_libc.timerfd_settime.argtypes = [
    ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.POINTER(_Itimerspec)
]
_libc.timerfd_settime.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class Timer:
    """A timerfd that polls readable once time.monotonic() reaches the deadline set last."""

    def __init__(self) -> None:
        self._fd = _check(_libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC),
                          "timerfd_create")

    def fileno(self) -> int:
        return self._fd

    def set(self, deadline: float | None) -> None:
        """Fire at `deadline` (a time.monotonic() value; a past one fires at once), or never."""
        spec = _Itimerspec()  # all zero: disarmed
        if deadline is not None:
            # Absolute time: no drift between computing the deadline and arming. A zero value
            # would mean "disarm", so the earliest possible instant is 1 ns.
            ns = max(1, math.ceil(deadline * 1e9))
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        _check(_libc.timerfd_settime(self._fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None),
               "timerfd_settime")

    def drain(self) -> bool:
        """Clear the readable state; True if the timer had fired."""
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
