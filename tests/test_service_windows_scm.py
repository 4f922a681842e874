"""The Windows service entry point (core/service/winsvc.py) against a recording fake SCM.

The fake plays the SCM's part through the same ctypes objects Windows would get: it reads
the SERVICE_TABLE_ENTRYW array, calls ServiceMain through its function pointer on a new
thread (as StartServiceCtrlDispatcherW does), and calls the registered HandlerEx on the
dispatcher's own thread once the service reports RUNNING. CFUNCTYPE stands in for
WINFUNCTYPE, which only exists on Windows (on x64 Windows both are the same convention).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from ctun.core import daemon
from ctun.core.service import winsvc
from ctun.core.service.winsvc import (
    ERROR_CALL_NOT_IMPLEMENTED,
    ERROR_SERVICE_SPECIFIC_ERROR,
    NO_ERROR,
    SERVICE_ACCEPT_SHUTDOWN,
    SERVICE_ACCEPT_STOP,
    SERVICE_CONTROL_INTERROGATE,
    SERVICE_CONTROL_SHUTDOWN,
    SERVICE_CONTROL_STOP,
    SERVICE_RUNNING,
    SERVICE_START_PENDING,
    SERVICE_STATUS,
    SERVICE_STOP_PENDING,
    SERVICE_STOPPED,
    SERVICE_TABLE_ENTRYW,
    SERVICE_WIN32_OWN_PROCESS,
)

MAIN_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.POINTER(ctypes.c_wchar_p))
HANDLER_TYPE = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                                ctypes.c_void_p, ctypes.c_void_p)
HANDLE = 0x5C5C
TIMEOUT = 10.0
SERVICE_CONTROL_PAUSE = 2  # not accepted by ctun


class FakeScm:
    """A recording ServiceApi that drives the service the way the SCM does."""

    def __init__(self, controls: Sequence[int] = (), connect_error: int = 0,
                 start_args: Sequence[str] = ()) -> None:
        self.controls = list(controls)  # sent, in order, once RUNNING is reported
        self.connect_error = connect_error  # nonzero: not started by the SCM
        self.start_args = list(start_args)  # `sc.exe start ctun ARGS`
        self.calls: list[tuple[Any, ...]] = []
        self.statuses: list[dict[str, int]] = []
        self.answers: list[tuple[int, int]] = []  # (control, handler's return value)
        self.handler: Any = None
        self.running = threading.Event()
        self.last_error = 0

    def service_main_function(self, fn: Any) -> Any:
        return MAIN_TYPE(fn)

    def handler_function(self, fn: Any) -> Any:
        return HANDLER_TYPE(fn)

    def StartServiceCtrlDispatcherW(self, table: Any) -> bool:
        entries = [(table[i].lpServiceName, table[i].lpServiceProc) for i in range(2)]
        self.calls.append(("StartServiceCtrlDispatcherW", entries[0][0]))
        if self.connect_error:
            self.last_error = self.connect_error
            return False
        assert entries[1] == (None, None), "the table must end with a NULL entry"
        # Through the raw pointer, as Windows would: what was in the table must be callable.
        service_main = MAIN_TYPE(entries[0][1])
        argv = (ctypes.c_wchar_p * (1 + len(self.start_args)))("ctun", *self.start_args)
        thread = threading.Thread(target=service_main, args=(len(argv), argv))
        thread.start()
        while thread.is_alive() and not self.running.wait(0.01):
            pass
        for control in self.controls if self.running.is_set() else []:
            # The dispatcher's thread (this one) runs the handler, as on Windows.
            self.answers.append((control, self.handler(control, 0, None, None)))
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "ServiceMain did not return"
        return True

    def RegisterServiceCtrlHandlerExW(self, name: str, handler: Any, context: Any) -> int:
        self.calls.append(("RegisterServiceCtrlHandlerExW", name, context))
        self.handler = handler
        return HANDLE

    def SetServiceStatus(self, handle: int, status: SERVICE_STATUS) -> bool:
        assert handle == HANDLE
        fields = {name: getattr(status, name) for name, *_ in SERVICE_STATUS._fields_}
        self.calls.append(("SetServiceStatus", fields["dwCurrentState"]))
        self.statuses.append(fields)
        if fields["dwCurrentState"] == SERVICE_RUNNING:
            self.running.set()
        return True

    def GetLastError(self) -> int:
        return self.last_error


def status(state: int, *, accepted: int = 0, win32: int = NO_ERROR, specific: int = 0,
           checkpoint: int = 0, hint: int = 0) -> dict[str, int]:
    return {"dwServiceType": SERVICE_WIN32_OWN_PROCESS, "dwCurrentState": state,
            "dwControlsAccepted": accepted, "dwWin32ExitCode": win32,
            "dwServiceSpecificExitCode": specific, "dwCheckPoint": checkpoint,
            "dwWaitHint": hint}


START_PENDING = status(SERVICE_START_PENDING, checkpoint=1, hint=30_000)
RUNNING = status(SERVICE_RUNNING, accepted=SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN)
STOP_PENDING = status(SERVICE_STOP_PENDING, checkpoint=1, hint=30_000)
STOPPED = status(SERVICE_STOPPED)


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real config load, hermetic: the key goes to a tmp state dir."""
    monkeypatch.setenv("CTUN_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "ctun.toml"
    path.write_text("[docker]\nenabled = false\n")
    return str(path)


@pytest.fixture
def daemon_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, threading.Event]]]:
    """daemon.run replaced: it waits for its stop event, like the real one."""
    runs: list[tuple[Any, threading.Event]] = []

    def fake_run(cfg: Any, _pm: Any, stop: threading.Event) -> None:
        runs.append((cfg, stop))
        assert stop.wait(TIMEOUT), "never told to stop"

    monkeypatch.setattr(daemon, "run", fake_run)
    yield runs


def run_service(scm: FakeScm, args: list[str], tmp_path: Path) -> int:
    return winsvc.main(args, api=scm, log_path=tmp_path / "logs" / "ctun.log")


def test_start_then_stop_reports_each_state_in_order(
        tmp_path: Path, config_file: str, daemon_runs: list[Any]) -> None:
    scm = FakeScm(controls=[SERVICE_CONTROL_INTERROGATE, SERVICE_CONTROL_PAUSE, 200,
                            SERVICE_CONTROL_STOP, SERVICE_CONTROL_STOP])
    assert run_service(scm, ["--no-ui", "--config", config_file, "--port", "2600"],
                       tmp_path) == 0
    assert scm.calls == [
        ("StartServiceCtrlDispatcherW", "ctun"),
        ("RegisterServiceCtrlHandlerExW", "ctun", None),
        ("SetServiceStatus", SERVICE_START_PENDING),
        ("SetServiceStatus", SERVICE_RUNNING),
        ("SetServiceStatus", SERVICE_STOP_PENDING),  # once, though STOP came twice
        ("SetServiceStatus", SERVICE_STOPPED),
    ]
    assert scm.statuses == [START_PENDING, RUNNING, STOP_PENDING, STOPPED]
    assert scm.answers == [(SERVICE_CONTROL_INTERROGATE, NO_ERROR),
                           (SERVICE_CONTROL_PAUSE, ERROR_CALL_NOT_IMPLEMENTED),
                           (200, ERROR_CALL_NOT_IMPLEMENTED),
                           (SERVICE_CONTROL_STOP, NO_ERROR), (SERVICE_CONTROL_STOP, NO_ERROR)]
    # The daemon got the service's arguments, parsed like `ctun up`'s, and its stop event.
    [(cfg, stop)] = daemon_runs
    assert cfg.listen[1] == 2600 and stop.is_set()
    log = (tmp_path / "logs" / "ctun.log").read_text()
    assert "service ctun running" in log and "service ctun stopped" in log


def test_shutdown_stops_it_too_and_start_parameters_follow_the_bin_path_ones(
        tmp_path: Path, config_file: str, daemon_runs: list[Any]) -> None:
    scm = FakeScm(controls=[SERVICE_CONTROL_SHUTDOWN], start_args=["--port", "2700"])
    assert run_service(scm, ["--no-ui", "--config", config_file, "--port", "2600"],
                       tmp_path) == 0
    assert scm.statuses == [START_PENDING, RUNNING, STOP_PENDING, STOPPED]
    assert daemon_runs[0][0].listen[1] == 2700


def test_the_daemon_returning_by_itself_is_a_clean_stop(
        tmp_path: Path, config_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. `ctun down` over the control socket: no STOP from the SCM, no STOP_PENDING.
    monkeypatch.setattr(daemon, "run", lambda cfg, pm, stop: None)
    scm = FakeScm()
    assert run_service(scm, ["--no-ui", "--config", config_file], tmp_path) == 0
    assert scm.statuses == [START_PENDING, RUNNING, STOPPED]


@pytest.mark.parametrize("args", [["--no-ui", "--port", "0"],  # a bad setting
                                  ["--no-ui", "--bogus"],  # not a `ctun up` flag
                                  ["--no-ui", "--transport", "carrier-pigeon"]])
def test_a_config_error_is_service_specific_code_2(
        tmp_path: Path, config_file: str, daemon_runs: list[Any], args: list[str]) -> None:
    scm = FakeScm(controls=[SERVICE_CONTROL_STOP])
    assert run_service(scm, [*args, "--config", config_file], tmp_path) == 0
    # Never RUNNING: the SCM sees the start fail, with the reason in dwServiceSpecificExitCode.
    assert scm.statuses == [START_PENDING, status(SERVICE_STOPPED,
                                                  win32=ERROR_SERVICE_SPECIFIC_ERROR,
                                                  specific=2)]
    assert scm.answers == [] and daemon_runs == []
    assert "cannot start:" in (tmp_path / "logs" / "ctun.log").read_text()


def test_a_daemon_crash_is_service_specific_code_1(
        tmp_path: Path, config_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(cfg: Any, pm: Any, stop: threading.Event) -> None:
        raise RuntimeError("the tunnel engine stopped unexpectedly")

    monkeypatch.setattr(daemon, "run", crash)
    scm = FakeScm()
    assert run_service(scm, ["--no-ui", "--config", config_file], tmp_path) == 0
    assert scm.statuses == [START_PENDING, RUNNING,
                            status(SERVICE_STOPPED, win32=ERROR_SERVICE_SPECIFIC_ERROR,
                                   specific=1)]
    log = (tmp_path / "logs" / "ctun.log").read_text()
    assert "the daemon failed" in log and "RuntimeError: the tunnel engine" in log


def test_an_unexpected_error_before_the_daemon_is_code_1(
        tmp_path: Path, config_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctun.core import plugins

    def broken() -> Any:
        raise RuntimeError("a plugin exploded")

    monkeypatch.setattr(plugins, "create_manager", broken)
    scm = FakeScm()
    assert run_service(scm, ["--no-ui", "--config", config_file], tmp_path) == 0
    assert scm.statuses == [START_PENDING, status(SERVICE_STOPPED,
                                                  win32=ERROR_SERVICE_SPECIFIC_ERROR,
                                                  specific=1)]


def test_started_from_a_console_it_says_what_to_run_and_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scm = FakeScm(connect_error=winsvc.ERROR_FAILED_SERVICE_CONTROLLER_CONNECT)
    assert run_service(scm, ["--no-ui"], tmp_path) == 2
    assert scm.calls == [("StartServiceCtrlDispatcherW", "ctun")]
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert "`ctun service start`" in out.err and "`ctun up --no-ui`" in out.err


def test_another_dispatcher_failure_is_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_service(FakeScm(connect_error=5), ["--no-ui"], tmp_path) == 1
    assert "StartServiceCtrlDispatcherW failed: error 5" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="the non-Windows refusal")
def test_off_windows_without_a_fake_it_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert winsvc.main(["--no-ui"]) == 2
    assert "only on Windows" in capsys.readouterr().err
    with pytest.raises(OSError):
        winsvc.Win32Api()


def test_win32_constants_have_their_real_values() -> None:
    assert (winsvc.SERVICE_WIN32_OWN_PROCESS, winsvc.SERVICE_STOPPED,
            winsvc.SERVICE_START_PENDING, winsvc.SERVICE_STOP_PENDING,
            winsvc.SERVICE_RUNNING) == (0x10, 1, 2, 3, 4)
    assert (winsvc.SERVICE_CONTROL_STOP, winsvc.SERVICE_CONTROL_INTERROGATE,
            winsvc.SERVICE_CONTROL_SHUTDOWN) == (1, 4, 5)
    assert (winsvc.SERVICE_ACCEPT_STOP, winsvc.SERVICE_ACCEPT_SHUTDOWN) == (1, 4)
    assert (winsvc.NO_ERROR, winsvc.ERROR_CALL_NOT_IMPLEMENTED,
            winsvc.ERROR_FAILED_SERVICE_CONTROLLER_CONNECT,
            winsvc.ERROR_SERVICE_SPECIFIC_ERROR) == (0, 120, 1063, 1066)


def test_service_status_layout_is_seven_dwords() -> None:
    # winsvc.h: typedef struct _SERVICE_STATUS { DWORD x7 } — 28 bytes on x86 and x64.
    names = ["dwServiceType", "dwCurrentState", "dwControlsAccepted", "dwWin32ExitCode",
             "dwServiceSpecificExitCode", "dwCheckPoint", "dwWaitHint"]
    assert [name for name, *_ in SERVICE_STATUS._fields_] == names
    assert ctypes.sizeof(SERVICE_STATUS) == 28
    for i, name in enumerate(names):
        field = getattr(SERVICE_STATUS, name)
        assert (field.offset, field.size) == (4 * i, 4)
    # Unsigned: a DWORD holds values above 2**31.
    assert SERVICE_STATUS(dwWaitHint=0xFFFFFFFF).dwWaitHint == 0xFFFFFFFF


def test_service_table_entry_layout_is_two_pointers() -> None:
    # typedef struct _SERVICE_TABLE_ENTRYW { LPWSTR lpServiceName;
    #   LPSERVICE_MAIN_FUNCTIONW lpServiceProc; } — 16 bytes on x64, 8 on x86.
    ptr = ctypes.sizeof(ctypes.c_void_p)
    assert [name for name, *_ in SERVICE_TABLE_ENTRYW._fields_] == ["lpServiceName",
                                                                    "lpServiceProc"]
    assert ctypes.sizeof(SERVICE_TABLE_ENTRYW) == 2 * ptr
    assert (SERVICE_TABLE_ENTRYW.lpServiceName.offset,
            SERVICE_TABLE_ENTRYW.lpServiceName.size) == (0, ptr)
    assert (SERVICE_TABLE_ENTRYW.lpServiceProc.offset,
            SERVICE_TABLE_ENTRYW.lpServiceProc.size) == (ptr, ptr)
    # The array StartServiceCtrlDispatcherW gets: entries back to back, NULL-terminated.
    table = (SERVICE_TABLE_ENTRYW * 2)(SERVICE_TABLE_ENTRYW("ctun", 1234),
                                       SERVICE_TABLE_ENTRYW(None, None))
    assert ctypes.sizeof(table) == 4 * ptr
    assert ctypes.c_void_p.from_buffer(table, 3 * ptr).value is None
    assert ctypes.c_void_p.from_buffer(table, ptr).value == 1234
