"""The control socket: any request line gets an answer object, never an exception."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from ctun.core import control
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = control.ControlServer(tmp_path / "ctun0.sock", {"status": lambda _r: {"status": 1}})
    srv.start()
    yield srv
    srv.close()


def test_request_round_trip(server: control.ControlServer) -> None:
    assert control.request(server.path, "status")["status"] == 1


def test_unknown_command_is_a_clear_error(server: control.ControlServer) -> None:
    with pytest.raises(control.ControlError, match=r"unknown cmd 'nope' \(known: status\)"):
        control.request(server.path, "nope")


def test_socket_is_not_world_accessible(server: control.ControlServer) -> None:
    assert server.path.stat().st_mode & 0o007 == 0


def test_close_removes_the_socket(tmp_path: Path) -> None:
    srv = control.ControlServer(tmp_path / "x.sock", {})
    srv.start()
    srv.close()
    assert not (tmp_path / "x.sock").exists()


def test_no_daemon_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(control.ControlError, match="no ctun is running here"):
        control.request(tmp_path / "missing.sock", "status")


LINES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda obj: json.dumps(obj).encode(),
              st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["cmd", "x"]), inner, max_size=3),
                           max_leaves=8)),
)


@settings(max_examples=300)
@given(line=LINES)
def test_any_request_line_gets_an_answer(line: bytes) -> None:
    srv = control.ControlServer.__new__(control.ControlServer)
    srv._handlers = {"status": lambda _r: {"status": 1}}
    srv._stream = None  # what __init__ sets without a stream; answer() reads it
    answer = srv.answer(line)
    assert answer["v"] == control.SCHEMA and isinstance(answer["ok"], bool)
    assert answer["ok"] == (answer.get("status") == 1)
    json.dumps(answer)


@pytest.mark.parametrize(("platform", "expected"), [("linux", "/run/ctun"),
                                                    ("darwin", "/var/run/ctun")])
def test_run_dir_is_where_each_os_keeps_it(monkeypatch: pytest.MonkeyPatch, platform: str,
                                           expected: str) -> None:
    import sys

    monkeypatch.delenv("CTUN_RUN_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", platform)
    assert str(control.run_dir()) == expected
    assert str(control.socket_path("ctun0")) == f"{expected}/ctun0.sock"


class Counting:
    """A stream source: every snapshot counts up, and carries the events so far."""

    def __init__(self) -> None:
        self.calls = 0
        self.events: list[dict[str, Any]] = []

    def __call__(self, _request: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"status": {"n": self.calls, "events": list(self.events)}}


@pytest.fixture
def streaming(tmp_path: Path) -> Any:
    source = Counting()
    srv = control.ControlServer(tmp_path / "s.sock", {"status": source}, stream=source)
    srv.start()
    yield srv, source
    srv.close()


def test_subscribers_get_fresh_snapshots_and_each_event_once(streaming: Any) -> None:
    srv, source = streaming
    feed = control.subscribe(srv.path, interval=0.05)
    first = next(feed)
    assert first["event"] == "snapshot" and first["status"]["events"] == []
    source.events.append({"id": 1, "state": "up"})
    seen: list[dict[str, Any]] = []
    numbers = [first["status"]["n"]]
    for snapshot in feed:
        numbers.append(snapshot["status"]["n"])
        seen += snapshot["status"]["events"]
        if len(numbers) == 6:
            break
    feed.close()
    assert numbers == sorted(numbers) and len(set(numbers)) == 6
    assert seen == [{"id": 1, "state": "up"}]


def test_a_subscription_with_a_bad_interval_is_refused(streaming: Any) -> None:
    srv, _ = streaming
    for interval in (0, 0.001, 61, "1"):
        with pytest.raises(control.ControlError, match="interval must be a number of seconds"):
            next(control.subscribe(srv.path, interval=interval))  # type: ignore[arg-type]


def test_a_client_that_stops_reading_holds_up_nobody(streaming: Any) -> None:
    srv, _ = streaming
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(str(srv.path))
    stuck.sendall(b'{"cmd": "subscribe", "interval": 0.05}\n')
    try:
        # Its snapshots pile up unread; everyone else is answered at once all along.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert control.request(srv.path, "status")["status"]["n"] >= 1
            assert time.monotonic() - started < 0.5
    finally:
        stuck.close()


def test_a_handler_refusal_is_an_error_object_not_a_crash(tmp_path: Path) -> None:
    def refuse(_request: dict[str, Any]) -> dict[str, Any]:
        raise control.RequestError("network must be an IPv4 network")

    srv = control.ControlServer(tmp_path / "r.sock", {"add_route": refuse})
    srv.start()
    try:
        answer = srv.answer(b'{"cmd": "add_route", "network": "x"}\n')
        assert answer == {"v": control.SCHEMA, "ok": False,
                          "error": "network must be an IPv4 network"}
        with pytest.raises(control.ControlError, match=r"^network must be an IPv4 network$"):
            control.request(srv.path, "add_route", network="x")
    finally:
        srv.close()


GROUP = "ctuntestgrp"
MEMBER, OUTSIDER = "ctuntestin", "ctuntestout"


@pytest.fixture
def users() -> Any:
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to make a group and two users")
    subprocess.run(["groupadd", "-f", GROUP], check=True)
    for user in (MEMBER, OUTSIDER):
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", user], check=True)
    subprocess.run(["usermod", "-aG", GROUP, MEMBER], check=True)
    yield
    for user in (MEMBER, OUTSIDER):
        subprocess.run(["userdel", user], capture_output=True)
    subprocess.run(["groupdel", GROUP], capture_output=True)


@pytest.mark.root
def test_group_members_may_ask_and_others_get_a_line_naming_the_group(
        users: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="ctun-ctl-") as run:
        os.chmod(run, 0o755)
        path = Path(run) / "ctun0.sock"
        srv = control.ControlServer(path, {"status": lambda _r: {"status": {"role": "t"}}},
                                    group=GROUP)
        srv.start()
        try:
            assert srv.group == GROUP and path.stat().st_mode & 0o777 == 0o660
            def ask(user: str) -> str:
                """control.request() as `user`, in a child process that dropped root."""
                import pwd

                record = pwd.getpwnam(user)
                groups = os.getgrouplist(user, record.pw_gid)
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: become the user, ask, report, never return
                    try:
                        os.setgroups(groups)
                        os.setgid(record.pw_gid)
                        os.setuid(record.pw_uid)
                        try:
                            text = control.request(path, "status")["status"]["role"]
                        except control.ControlError as exc:
                            text = f"error: {exc}"
                        os.write(write, text.encode())
                    finally:
                        os._exit(0)
                os.close(write)
                with os.fdopen(read, "rb") as answer:
                    text = answer.read().decode()
                os.waitpid(pid, 0)
                return text

            assert ask(MEMBER) == "t"
            answer = ask(OUTSIDER)
            assert answer.startswith(f"error: permission denied on {path}: you are not in "
                                     f"group '{GROUP}'"), answer
            assert "\n" not in answer
        finally:
            srv.close()


def test_a_missing_group_leaves_the_socket_to_root(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    srv = control.ControlServer(tmp_path / "g.sock", {}, group="no-such-group-ctun")
    try:
        assert srv.group is None
        assert "group 'no-such-group-ctun' does not exist" in caplog.text
        assert (tmp_path / "g.sock").stat().st_mode & 0o007 == 0
    finally:
        srv.close()


def test_a_streaming_server_names_subscribe_among_its_commands(streaming: Any) -> None:
    srv, _ = streaming
    with pytest.raises(control.ControlError, match=r"\(known: status, subscribe\)$"):
        control.request(srv.path, "nope")
