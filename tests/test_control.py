"""The control socket: any request line gets an answer object, never an exception."""

from __future__ import annotations

import json
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
