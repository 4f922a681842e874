"""The control socket: a Unix socket speaking JSON lines, one request and one answer each.

Each client gets its own thread and only ever reads snapshots, so a slow or stuck client can
never hold up the packet path or another client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

log = logging.getLogger("ctun.control")

SCHEMA = 1
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 30.0
SEND_TIMEOUT = 5.0  # a subscriber that takes no data for this long is dropped
MIN_INTERVAL, MAX_INTERVAL = 0.05, 60.0
DEFAULT_GROUP = "ctun"

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def run_dir() -> Path:
    """Sockets, locks and crash state: $CTUN_RUN_DIR, else the OS's usual place."""
    if "CTUN_RUN_DIR" in os.environ:
        return Path(os.environ["CTUN_RUN_DIR"])
    if sys.platform == "darwin":
        return Path("/var/run/ctun")  # /run does not exist there and cannot be created
    if sys.platform == "win32":
        return Path(os.environ.get("PROGRAMDATA", "C:\\ProgramData")) / "ctun"
    return Path("/run/ctun")


def socket_path(interface: str) -> Path:
    return run_dir() / f"{interface}.sock"


class ControlError(Exception):
    """The daemon could not be asked; str() says why in one line."""


class RequestError(Exception):
    """A handler's answer to a request it cannot carry out; str() goes back to the client."""


class ControlServer:
    """Answers requests from `handlers`; with `stream`, also a `subscribe` request that is
    answered with a snapshot every `interval` seconds until the client goes away.

    The socket is read-write for root and `group` (when that group exists), so members can
    watch and steer the daemon without root; everyone else is refused by the kernel.
    """

    def __init__(self, path: Path, handlers: dict[str, Handler], group: str | None = None,
                 stream: Handler | None = None, owner: int | None = None) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._stream = stream
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket file left by a crashed run
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o660)
        self.group = _give_to_group(path, group) if group else None
        if owner is not None:
            # `ctun up` run by a user through sudo: that user's own TUI may attach.
            os.chown(path, owner, -1)
        self._sock.listen(16)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="ctun-control",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="ctun-control-client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # The client may go away at any point; closing its stream may say so once more.
        with contextlib.suppress(OSError):
            self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        with conn, conn.makefile("rwb") as stream:
            while not self._closed.is_set():
                try:
                    line = stream.readline(MAX_REQUEST + 1)
                except OSError:
                    return
                if not line:
                    return
                answer = self.answer(line)
                try:
                    stream.write(json.dumps(answer).encode() + b"\n")
                    stream.flush()
                except OSError:
                    return
                if answer.get("ok") and "subscribed" in answer:
                    self._feed(conn, stream, float(answer["subscribed"]))
                    return

    def _feed(self, conn: socket.socket, stream: Any, interval: float) -> None:
        """One snapshot per interval, each built fresh: a client that reads slowly gets fewer
        of them, never a backlog. One that stops reading is dropped after SEND_TIMEOUT; it
        only ever held up this thread."""
        assert self._stream is not None
        conn.settimeout(SEND_TIMEOUT)
        last_event = 0
        while not self._closed.wait(interval):
            try:
                snapshot = self._stream({})
            except Exception:
                log.exception("building a snapshot for a subscriber failed")
                return
            body = snapshot.get("status", snapshot)
            events = body.get("events") if isinstance(body, dict) else None
            if isinstance(events, list):
                # Each event once per subscriber: only those it has not been sent.
                body["events"] = [e for e in events if e.get("id", 0) > last_event]
                if events:
                    last_event = max(last_event, *(e.get("id", 0) for e in events))
            try:
                stream.write(json.dumps({"v": SCHEMA, "ok": True, "event": "snapshot",
                                         **snapshot}).encode() + b"\n")
                stream.flush()
            except OSError:
                return

    def answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"v": SCHEMA, "ok": False, "error": f"request over {MAX_REQUEST} bytes"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"v": SCHEMA, "ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"v": SCHEMA, "ok": False, "error": 'request must be {"cmd": "..."}'}
        if request["cmd"] == "subscribe" and self._stream is not None:
            interval = request.get("interval", 1.0)
            if type(interval) not in (int, float) or not \
                    MIN_INTERVAL <= interval <= MAX_INTERVAL:
                return {"v": SCHEMA, "ok": False,
                        "error": f"interval must be a number of seconds from {MIN_INTERVAL} "
                                 f"to {MAX_INTERVAL}"}
            return {"v": SCHEMA, "ok": True, "subscribed": float(interval)}
        handler = self._handlers.get(request["cmd"])
        if handler is None:
            names = [*self._handlers, *(["subscribe"] if self._stream is not None else [])]
            known = ", ".join(sorted(names))
            return {"v": SCHEMA, "ok": False,
                    "error": f"unknown cmd {request['cmd']!r} (known: {known})"}
        try:
            return {"v": SCHEMA, "ok": True, **handler(request)}
        except RequestError as exc:
            return {"v": SCHEMA, "ok": False, "error": str(exc)}
        except Exception as exc:  # one bad request must not take the daemon's socket down
            log.exception("control request %r failed", request["cmd"])
            return {"v": SCHEMA, "ok": False, "error": str(exc)}


def request(path: Path, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Ask a running daemon or agent; raises ControlError with a one-line reason."""
    sock = _connect(path, timeout)
    try:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline()
    except (TimeoutError, OSError) as exc:
        raise ControlError(f"{path}: {exc}") from None
    finally:
        sock.close()
    if not line:
        raise ControlError(f"{path}: the daemon closed the connection without answering")
    answer: dict[str, Any] = json.loads(line)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "request failed")))
    return answer


def _connect(path: Path, timeout: float) -> socket.socket:
    """A connected socket to the daemon, or ControlError saying in one line why not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise ControlError(f"no ctun is running here ({path} does not exist)") from None
    except ConnectionRefusedError:
        sock.close()
        raise ControlError(f"no ctun is answering on {path} (left by a stopped run)") from None
    except PermissionError:
        sock.close()
        raise ControlError(_permission_message(path)) from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"{path}: {exc}") from None
    return sock


def _give_to_group(path: Path, group: str) -> str | None:
    """Hand the socket to `group` (read-write); None when there is no such group here."""
    try:
        import grp  # not on Windows, which has no Unix groups to give it to

        gid = grp.getgrnam(group).gr_gid
    except (ImportError, KeyError):
        log.warning("group %r does not exist: only root can use `ctun status` and `ctun tui`; "
                    "create it (groupadd %s) and add users to it (usermod -aG %s NAME)",
                    group, group, group)
        return None
    os.chown(path, -1, gid)
    return group


def _permission_message(path: Path) -> str:
    group = None
    try:
        import grp

        group = grp.getgrgid(path.stat().st_gid).gr_name
    except (ImportError, KeyError, OSError):
        pass
    if group is None or group == "root":
        return f"permission denied on {path}: only root may use this ctun; run as root"
    return (f"permission denied on {path}: you are not in group {group!r}; join it "
            f"(sudo usermod -aG {group} $USER, then log in again) or run as root")


def subscribe(path: Path, interval: float = 1.0, timeout: float = 5.0
              ) -> Generator[dict[str, Any], None, None]:
    """Snapshots from a running daemon every `interval` seconds, until it goes away (then the
    iteration ends); ControlError when it cannot be asked at all."""
    sock = _connect(path, timeout)
    try:
        sock.sendall(json.dumps({"cmd": "subscribe", "interval": interval}).encode() + b"\n")
        if isinstance(interval, (int, float)):
            sock.settimeout(timeout + 3 * interval)  # a daemon that stops talking is gone
        with sock.makefile("rb") as stream:
            first = json.loads(stream.readline() or b"{}")
            if not first.get("ok"):
                raise ControlError(str(first.get("error", "the daemon refused to subscribe")))
            while True:
                try:
                    line = stream.readline()
                except OSError:
                    return
                if not line:
                    return
                yield json.loads(line)
    except OSError as exc:
        raise ControlError(f"{path}: {exc}") from None
    finally:
        sock.close()
