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
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("ctun.control")

SCHEMA = 1
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 30.0

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


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket file left by a crashed run
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o660)
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

    def answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"v": SCHEMA, "ok": False, "error": f"request over {MAX_REQUEST} bytes"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"v": SCHEMA, "ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"v": SCHEMA, "ok": False, "error": 'request must be {"cmd": "..."}'}
        handler = self._handlers.get(request["cmd"])
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return {"v": SCHEMA, "ok": False,
                    "error": f"unknown cmd {request['cmd']!r} (known: {known})"}
        try:
            return {"v": SCHEMA, "ok": True, **handler(request)}
        except Exception as exc:  # one bad request must not take the daemon's socket down
            log.exception("control request %r failed", request["cmd"])
            return {"v": SCHEMA, "ok": False, "error": str(exc)}


def request(path: Path, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Ask a running daemon or agent; raises ControlError with a one-line reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no ctun is running here ({path} does not exist)") from None
        except ConnectionRefusedError:
            raise ControlError(f"no ctun is answering on {path} (left by a stopped run)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root or join its group") \
                from None
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
