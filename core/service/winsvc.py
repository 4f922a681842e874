"""The Windows service entry point: `python -m ctun.core.service.winsvc [ctun up args]`.

The SCM starts the binPath command and expects it to connect within 30 s
(StartServiceCtrlDispatcherW), report its state (SetServiceStatus) and answer controls
(a HandlerEx registered with RegisterServiceCtrlHandlerExW); a plain `ctun up --no-ui`
does none of that, so the SCM gave up with error 1053. This module does it with ctypes
(no pywin32) and then runs the same daemon `ctun up --no-ui` runs, with a threading.Event
as its stop: SERVICE_CONTROL_STOP / SHUTDOWN set it.

Every Win32 call goes through ONE api object (ServiceApi; Win32Api is the real one), so
that tests on any OS can record the exact calls and play the SCM's part.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

SERVICE_NAME = "ctun"

# winsvc.h / winerror.h, with their real values.
SERVICE_WIN32_OWN_PROCESS = 0x10
SERVICE_STOPPED = 1
SERVICE_START_PENDING = 2
SERVICE_STOP_PENDING = 3
SERVICE_RUNNING = 4
SERVICE_CONTROL_STOP = 1
SERVICE_CONTROL_INTERROGATE = 4
SERVICE_CONTROL_SHUTDOWN = 5
SERVICE_ACCEPT_STOP = 1
SERVICE_ACCEPT_SHUTDOWN = 4
NO_ERROR = 0
ERROR_CALL_NOT_IMPLEMENTED = 120
ERROR_FAILED_SERVICE_CONTROLLER_CONNECT = 1063
ERROR_SERVICE_SPECIFIC_ERROR = 1066

# dwServiceSpecificExitCode, shown by `sc.exe query ctun`; the same meaning as `ctun up`'s
# exit status 2 (fix a setting) versus anything else.
EXIT_CONFIG_ERROR = 2
EXIT_FAILURE = 1

# Config, key and plugin loading happen while START_PENDING; the daemon's teardown (routes,
# the agent container) while STOP_PENDING. Generous: the SCM only waits, it kills nothing.
START_WAIT_HINT_MS = 30_000
STOP_WAIT_HINT_MS = 30_000

CONSOLE_MESSAGE = (
    "ctun.core.service.winsvc: this is the Windows service's entry point and only the "
    "service control manager can start it: use `ctun service start`, or run `ctun up "
    "--no-ui` in this console")
NOT_WINDOWS_MESSAGE = (
    "ctun.core.service.winsvc: the Windows service entry point runs only on Windows: "
    "use `ctun up --no-ui`")

log = logging.getLogger("ctun.winsvc")

# DWORD is 32 bits on every Windows; c_uint32, not c_ulong, keeps the layout right (and
# checkable) on a 64-bit Linux too, where c_ulong has 64 bits.
DWORD = ctypes.c_uint32


class SERVICE_STATUS(ctypes.Structure):  # named as in winsvc.h
    _fields_ = [
        ("dwServiceType", DWORD),
        ("dwCurrentState", DWORD),
        ("dwControlsAccepted", DWORD),
        ("dwWin32ExitCode", DWORD),
        ("dwServiceSpecificExitCode", DWORD),
        ("dwCheckPoint", DWORD),
        ("dwWaitHint", DWORD),
    ]


class SERVICE_TABLE_ENTRYW(ctypes.Structure):  # named as in winsvc.h
    # lpServiceProc is an LPSERVICE_MAIN_FUNCTIONW: a code pointer, the size of any pointer.
    # c_void_p (the callback is cast to it) keeps this type free of WINFUNCTYPE, which
    # exists only on Windows.
    _fields_ = [
        ("lpServiceName", ctypes.c_wchar_p),
        ("lpServiceProc", ctypes.c_void_p),
    ]


ServiceMainCallback = Callable[[int, Any], None]  # (dwNumServicesArgs, LPWSTR *)
HandlerCallback = Callable[[int, int, Any, Any], int]  # (control, event type, data, context)


class ServiceApi(Protocol):
    """The Win32 calls this module makes, and the two callback types it hands to them."""

    def service_main_function(self, fn: ServiceMainCallback) -> Any:
        """fn as an LPSERVICE_MAIN_FUNCTIONW (a ctypes callback object)."""

    def handler_function(self, fn: HandlerCallback) -> Any:
        """fn as an LPHANDLER_FUNCTION_EX (a ctypes callback object)."""

    def StartServiceCtrlDispatcherW(self, table: ctypes.Array[SERVICE_TABLE_ENTRYW]) -> bool:
        ...

    def RegisterServiceCtrlHandlerExW(self, name: str, handler: Any, context: Any) -> int:
        ...

    def SetServiceStatus(self, handle: int, status: SERVICE_STATUS) -> bool: ...

    def GetLastError(self) -> int: ...


class Win32Api:
    """The real calls, through advapi32. Only constructible on Windows."""

    # Declared here: their assignments below are unreachable for mypy off Windows.
    _main_type: Any
    _handler_type: Any
    _start: Any
    _register: Any
    _set: Any

    def __init__(self) -> None:
        # The guard mypy understands: on other platforms the rest is not even type-checked
        # against WinDLL / WINFUNCTYPE, which typeshed defines for win32 only.
        if sys.platform != "win32":
            raise OSError("the Windows service API exists only on Windows")
        # use_last_error: ctypes saves GetLastError right after each call, before Python
        # code can overwrite it.
        advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
        self._main_type = ctypes.WINFUNCTYPE(None, DWORD, ctypes.POINTER(ctypes.c_wchar_p))
        self._handler_type = ctypes.WINFUNCTYPE(DWORD, DWORD, DWORD, ctypes.c_void_p,
                                                ctypes.c_void_p)
        self._start = advapi32.StartServiceCtrlDispatcherW
        self._start.argtypes = [ctypes.POINTER(SERVICE_TABLE_ENTRYW)]
        self._start.restype = ctypes.c_int
        self._register = advapi32.RegisterServiceCtrlHandlerExW
        self._register.argtypes = [ctypes.c_wchar_p, self._handler_type, ctypes.c_void_p]
        self._register.restype = ctypes.c_void_p  # SERVICE_STATUS_HANDLE; NULL on failure
        self._set = advapi32.SetServiceStatus
        self._set.argtypes = [ctypes.c_void_p, ctypes.POINTER(SERVICE_STATUS)]
        self._set.restype = ctypes.c_int

    def service_main_function(self, fn: ServiceMainCallback) -> Any:
        return self._main_type(fn)

    def handler_function(self, fn: HandlerCallback) -> Any:
        return self._handler_type(fn)

    def StartServiceCtrlDispatcherW(self, table: ctypes.Array[SERVICE_TABLE_ENTRYW]) -> bool:
        return bool(self._start(table))

    def RegisterServiceCtrlHandlerExW(self, name: str, handler: Any, context: Any) -> int:
        return int(self._register(name, handler, context) or 0)

    def SetServiceStatus(self, handle: int, status: SERVICE_STATUS) -> bool:
        return bool(self._set(handle, ctypes.byref(status)))

    def GetLastError(self) -> int:
        if sys.platform != "win32":  # typeshed: get_last_error exists on Windows only
            raise OSError("the Windows service API exists only on Windows")
        return ctypes.get_last_error()


LOG_HINT = "%ProgramData%\\ctun\\ctun.log"


def default_log_path() -> Path:
    """%ProgramData%\\ctun\\ctun.log: next to the config and the state dir, and there is
    no console to write to."""
    return Path(os.environ.get("PROGRAMDATA", "C:\\ProgramData")) / "ctun" / "ctun.log"


class Service:
    """One run of the service: ServiceMain, the control handler and the status reports."""

    def __init__(self, api: ServiceApi, args: Sequence[str], log_path: Path | None = None):
        self.api = api
        self.args = list(args)  # from binPath: `--no-ui [--config F] [extra]`
        self.log_path = log_path if log_path is not None else default_log_path()
        self.stop = threading.Event()
        self._lock = threading.Lock()  # one status report at a time, in order
        self._handle = 0
        self._state = 0  # nothing reported yet
        self._checkpoint = 0
        # The SCM calls these through raw pointers: they must live as long as the process
        # may call them, so the objects are kept here, never only in a temporary.
        self._main_cb = api.service_main_function(self._service_main)
        self._handler_cb = api.handler_function(self._handler)

    def dispatch(self) -> bool:
        """Connect to the SCM; returns when the service has stopped (False: could not)."""
        table = (SERVICE_TABLE_ENTRYW * 2)(
            SERVICE_TABLE_ENTRYW(SERVICE_NAME, ctypes.cast(self._main_cb, ctypes.c_void_p)),
            SERVICE_TABLE_ENTRYW(None, None),  # the table ends with a NULL entry
        )
        return self.api.StartServiceCtrlDispatcherW(table)

    # -- called by the SCM -----------------------------------------------------------------

    def _service_main(self, argc: int, argv: Any) -> None:
        # A ctypes callback cannot raise into Windows: everything is caught here.
        try:
            # argv[0] is the service name; the rest are `sc.exe start ctun ARGS` and go
            # after binPath's arguments, as one more way to pass `ctun up` flags.
            extra = [argv[i] for i in range(1, argc)]
            self._run([*self.args, *extra])
        except BaseException:  # the SCM must hear of it; nothing above would catch it
            log.exception("the service failed")
            self._report(SERVICE_STOPPED, exit_code=EXIT_FAILURE)

    def _handler(self, control: int, _event_type: int, _data: Any, _context: Any) -> int:
        if control in (SERVICE_CONTROL_STOP, SERVICE_CONTROL_SHUTDOWN):
            with self._lock:
                # STOP_PENDING before the event: once set, the daemon may return and
                # STOPPED must come after it, never before.
                if self._state == SERVICE_RUNNING:
                    self._report_locked(SERVICE_STOP_PENDING)
            self.stop.set()
            return NO_ERROR
        if control == SERVICE_CONTROL_INTERROGATE:
            return NO_ERROR  # the SCM already has the last reported status
        return ERROR_CALL_NOT_IMPLEMENTED

    # -- the service -------------------------------------------------------------------------

    def _run(self, args: list[str]) -> None:
        self._handle = self.api.RegisterServiceCtrlHandlerExW(SERVICE_NAME, self._handler_cb,
                                                              None)
        if not self._handle:
            # Without a handle no status can be reported; the SCM will time out (1053).
            log.error("RegisterServiceCtrlHandlerExW failed: error %d", self.api.GetLastError())
            return
        self._report(SERVICE_START_PENDING)
        listener = _log_to_file(self.log_path)
        try:
            code = self._daemon(args)
        finally:
            listener.stop()  # flush the log first: after STOPPED the process may end
        self._report(SERVICE_STOPPED, exit_code=code)

    def _daemon(self, args: list[str]) -> int:
        """What `ctun up --no-ui` does with args; the service-specific exit code (0: none)."""
        from ... import cli
        from ...core import config, daemon, logs, plugins, runtime

        config_errors = (config.ConfigError, cli.UserError, plugins.PluginError)
        try:
            # The same parser and overrides as `ctun up`, so the service takes exactly its
            # flags; _CheckingParser raises UserError instead of exiting the process.
            parsed = cli.build_parser(cli._CheckingParser).parse_args(["up", *args])
            logs.use_flag_level(parsed.log_level)
            cfg = config.load_host_config(parsed.config, cli._overrides(
                parsed, (*cli._COMMON, "listen", *cli._DOCKER_FLAGS)))
            logs.apply_config_level(cfg.loglevel)
            pm = plugins.create_manager()
            runtime.transport_classes(pm, cfg.transport)
        except config_errors as exc:
            log.error("cannot start: %s", exc)
            return EXIT_CONFIG_ERROR
        self._report(SERVICE_RUNNING)
        log.info("service %s running (pid %d)", SERVICE_NAME, os.getpid())
        try:
            daemon.run(cfg, pm, self.stop)
        except config_errors as exc:
            log.error("stopped: %s", exc)
            return EXIT_CONFIG_ERROR
        except Exception:
            log.exception("the daemon failed")
            return EXIT_FAILURE
        log.info("service %s stopped", SERVICE_NAME)
        return 0

    def _report(self, state: int, exit_code: int = 0) -> None:
        with self._lock:
            self._report_locked(state, exit_code)

    def _report_locked(self, state: int, exit_code: int = 0) -> None:
        if self._state == SERVICE_STOPPED or not self._handle:
            return  # nothing may follow STOPPED; no handle, no reports
        pending = state in (SERVICE_START_PENDING, SERVICE_STOP_PENDING)
        # The checkpoint counts progress within a pending state; 0 otherwise.
        self._checkpoint = self._checkpoint + 1 if pending else 0
        status = SERVICE_STATUS(
            dwServiceType=SERVICE_WIN32_OWN_PROCESS,
            dwCurrentState=state,
            # Controls only while running: a stop during start or stop has nothing to stop.
            dwControlsAccepted=(SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN
                                if state == SERVICE_RUNNING else 0),
            dwWin32ExitCode=ERROR_SERVICE_SPECIFIC_ERROR if exit_code else NO_ERROR,
            dwServiceSpecificExitCode=exit_code,
            dwCheckPoint=self._checkpoint,
            dwWaitHint=(START_WAIT_HINT_MS if state == SERVICE_START_PENDING
                        else STOP_WAIT_HINT_MS if state == SERVICE_STOP_PENDING else 0),
        )
        self._state = state
        if not self.api.SetServiceStatus(self._handle, status):
            log.warning("SetServiceStatus(%d) failed: error %d", state, self.api.GetLastError())


def _log_to_file(path: Path) -> logging.handlers.QueueListener:
    """Like core.logs.setup, into a file: a service has no console (stderr goes nowhere)."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handlers: list[logging.Handler] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rotated: the service runs for months.
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=3,
                                                       encoding="utf-8")
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handlers.append(handler)
    except OSError:
        pass  # no log file is no reason not to run; `sc.exe query` still shows the outcome
    listener = logging.handlers.QueueListener(records, *handlers)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(logging.INFO)
    listener.start()
    return listener


def main(argv: Sequence[str] | None = None, api: ServiceApi | None = None,
         log_path: Path | None = None) -> int:
    """The process the SCM starts; argv: the `ctun up` arguments from binPath."""
    args = list(sys.argv[1:] if argv is None else argv)
    if api is None:
        if sys.platform != "win32":
            print(NOT_WINDOWS_MESSAGE, file=sys.stderr)
            return 2
        api = Win32Api()
    service = Service(api, args, log_path)
    if service.dispatch():
        return 0  # the outcome went to the SCM with SERVICE_STOPPED
    error = api.GetLastError()
    if error == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
        print(CONSOLE_MESSAGE, file=sys.stderr)
        return 2
    print(f"ctun.core.service.winsvc: StartServiceCtrlDispatcherW failed: error {error}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
