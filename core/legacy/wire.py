"""docker-connector's UDP format, as bytes: what legacy mode sends and how it reads what arrives.

Pure functions and small state machines, no sockets. Nothing in this format is authenticated
or encrypted (docs/legacy.md): every parser here treats its input as hostile, returns None or
raises WireError for anything it does not expect, and never grows without bound.

Host <-> VM side (one UDP datagram each):
  raw IPv4 packet                     either way
  0x00                                VM -> host: hello / heartbeat
  0x01 LEN_HI LEN_LO, then LEN bytes  host -> VM: control push (comma-separated commands)
Accessor <-> host's expose port:
  0x00 TOKEN / 0x01 TOKEN             accessor -> host: login / login again
  0x01 "addr IP/P,peer IP,mtu N[,route CIDR]..."   host -> accessor: accepted
  0x02                                host -> accessor: not logged in
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from ..relay import checksum

HEARTBEAT = b"\x00"
CONTROL = 0x01  # first byte of a control push header (and of docker-connector's config write)
LOGIN_FIRST, LOGIN_AGAIN = 0x00, 0x01
ACCEPTED = 0x01  # first byte of the host's answer to a good login
NOT_LOGGED_IN = b"\x02"
HEADER_LEN = 3
MAX_BODY = 0xFFFF  # the length field has 16 bits
# docker-connector reads every datagram into a 2000-byte buffer: a body piece larger than its
# default MTU would be cut short there, whatever MTU the tunnel uses.
MAX_PIECE = 1400
MAX_TOKEN = 64
HEARTBEAT_EVERY = 5.0  # seconds: docker-connector's VM side, when it has sent nothing else
PUSH_TIMEOUT = 2.0  # a body not complete within this is dropped (a piece was lost)
VERBS = ("connect", "disconnect", "dns", "host")

_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
_TEXT_RE = re.compile(r"[ -~]*")  # printable ASCII: all a control body may hold


class WireError(ValueError):
    """Input that does not follow the format; str() says what, for counters and tests."""


# --- IPv4 packets ----------------------------------------------------------------------------


def is_ipv4_packet(datagram: bytes) -> bool:
    """Version 4, a sane header length, and a total length that is the datagram's own: what a
    raw packet in this format looks like (anything else is framing or garbage)."""
    if len(datagram) < 20 or datagram[0] >> 4 != 4:
        return False
    header_len = (datagram[0] & 0x0F) * 4
    return header_len >= 20 and int.from_bytes(datagram[2:4], "big") == len(datagram) \
        and header_len <= len(datagram)


def is_checked_ipv4_packet(datagram: bytes) -> bool:
    """is_ipv4_packet() and a correct header checksum: a body piece of printable text passes
    this only by a coincidence of 1 in 2^16 on top of the length matching."""
    if not is_ipv4_packet(datagram):
        return False
    header_len = (datagram[0] & 0x0F) * 4
    return checksum(datagram[:header_len]) == 0xFFFF


# --- control pushes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    verb: str  # one of VERBS
    args: tuple[str, ...]

    def text(self) -> str:
        return " ".join((self.verb, *self.args))


def connect(a: IPv4Network, b: IPv4Network, linked: bool = True) -> Command:
    """`connect A B` / `disconnect A B`. docker-connector's VM side looks each side up by the
    destination column of `route -n`, which shows network addresses without a mask."""
    return Command("connect" if linked else "disconnect",
                   (str(a.network_address), str(b.network_address)))


def dns(suffixes: Iterable[str]) -> Command:
    return Command("dns", tuple(suffixes))


def host(address: str, names: Iterable[str]) -> Command:
    return Command("host", (address, *names))


def encode_body(commands: Iterable[Command], limit: int = MAX_BODY) -> tuple[bytes, int]:
    """The body for `commands`, in order, and how many did not fit in `limit` bytes (those
    are left out whole, never cut)."""
    parts: list[bytes] = []
    size = left_out = 0
    for command in commands:
        for arg in command.args:
            if not arg or not _TEXT_RE.fullmatch(arg) or " " in arg or "," in arg:
                raise ValueError(f"{command.verb}: {arg!r} cannot travel in a control body")
        data = command.text().encode("ascii")
        extra = len(data) + (1 if parts else 0)
        if size + extra > limit:
            left_out += 1
            continue
        parts.append(data)
        size += extra
    return b",".join(parts), left_out


def push_datagrams(body: bytes, mtu: int) -> list[bytes]:
    """The datagrams of one control push: the 3-byte header alone, then the body in pieces of
    at most min(mtu, MAX_PIECE) bytes, as docker-connector sends it. Nothing for no body."""
    if not body:
        return []
    if len(body) > MAX_BODY:
        raise ValueError(f"a control body is at most {MAX_BODY} bytes, not {len(body)}")
    piece = min(mtu, MAX_PIECE)
    header = bytes((CONTROL, len(body) >> 8, len(body) & 0xFF))
    return [header, *(body[i:i + piece] for i in range(0, len(body), piece))]


class PushAssembler:
    """Collects one control push on the VM side: a header (which may carry the first body
    bytes too; docker-connector's VM side takes them), then pieces until the length is met.

    Pieces and raw packets share the socket; the caller hands over only datagrams that are
    not checked IPv4 packets while a push is open (is_checked_ipv4_packet)."""

    def __init__(self, timeout: float = PUSH_TIMEOUT) -> None:
        self._timeout = timeout
        self._length = 0
        self._body = bytearray()
        self._since = 0.0

    @property
    def open(self) -> bool:
        """A push is waiting for more pieces."""
        return self._length > 0

    def expire(self, now: float) -> bool:
        """Drop an open push whose pieces stopped coming; True if one was dropped."""
        if self._length and now - self._since > self._timeout:
            self._length, self._body = 0, bytearray()
            return True
        return False

    def start(self, datagram: bytes, now: float) -> bytes | None:
        """A header datagram: the body if it is already complete, else None (more to come)."""
        if len(datagram) < HEADER_LEN or datagram[0] != CONTROL:
            raise WireError("push_malformed")
        length = int.from_bytes(datagram[1:3], "big")
        if length == 0:
            raise WireError("push_empty")
        self._length, self._body, self._since = length, bytearray(), now
        return self._take(datagram[HEADER_LEN:])

    def feed(self, datagram: bytes) -> bytes | None:
        """A piece of the open push: the body once complete, else None."""
        return self._take(datagram)

    def _take(self, piece: bytes) -> bytes | None:
        self._body += piece
        if len(self._body) < self._length:
            return None
        body, length = bytes(self._body), self._length
        self._length, self._body = 0, bytearray()
        if len(body) != length:
            raise WireError("push_overlong")
        return body


def decode_body(body: bytes) -> tuple[list[Command], list[str]]:
    """The commands of a body, and a reason for each part that is not one (skipped)."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return [], ["not_ascii"]
    if not _TEXT_RE.fullmatch(text):
        return [], ["not_printable"]
    commands, bad = [], []
    for part in text.split(","):
        words = part.split()
        if not words:
            continue  # an empty item (a trailing comma) is nothing, not an error
        command = Command(words[0], tuple(words[1:]))
        problem = _command_problem(command)
        if problem:
            bad.append(problem)
        else:
            commands.append(command)
    return commands, bad


def _command_problem(command: Command) -> str:
    verb, args = command.verb, command.args
    if verb in ("connect", "disconnect"):
        ok = len(args) == 2 and all(_is_network(a) for a in args)
    elif verb == "dns":
        ok = bool(args) and all(_is_name(_bare_suffix(a)) for a in args)
    elif verb == "host":
        ok = len(args) >= 2 and _is_address(args[0]) and all(_is_name(a) for a in args[1:])
    else:
        return "unknown_command"
    return "" if ok else f"bad_{verb}"


def dns_suffixes(command: Command) -> tuple[list[str], list[str]]:
    """The suffixes a `dns` command adds and those it removes (`-SUFFIX`), each lower case
    without dots around it."""
    added = [_bare_suffix(a) for a in command.args if not a.startswith("-")]
    removed = [_bare_suffix(a) for a in command.args if a.startswith("-")]
    return added, removed


def _bare_suffix(text: str) -> str:
    return text.removeprefix("-").strip(".").lower()


def link_side(text: str) -> IPv4Network:
    """A side of `connect A B`: a bare address is a /32 (vm/links.py resolves it to the
    routed subnet of its bridge, as docker-connector looks up its interface)."""
    return IPv4Network(text, strict=False)


def _is_network(text: str) -> bool:
    try:
        IPv4Network(text, strict=False)
    except ValueError:
        return False
    return True


def _is_address(text: str) -> bool:
    try:
        IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_name(text: str) -> bool:
    return bool(_NAME_RE.fullmatch(text)) and ".." not in text


# --- accessors ---------------------------------------------------------------------------------


def login_token(datagram: bytes) -> bytes | None:
    """The token of a login (0x00 or 0x01, then the token), or None if it is none."""
    if len(datagram) < 2 or len(datagram) > 1 + MAX_TOKEN or datagram[0] not in (
            LOGIN_FIRST, LOGIN_AGAIN):
        return None
    return datagram[1:]


def login(token: str, again: bool = False) -> bytes:
    return bytes((LOGIN_AGAIN if again else LOGIN_FIRST,)) + token.encode()


@dataclass(frozen=True)
class AccessConfig:
    """What an accessor is told when it logs in: its address in the tunnel network, the
    host's tunnel address (its point-to-point peer), the MTU and the routes it may use."""

    address: IPv4Interface
    peer: IPv4Address
    mtu: int
    routes: tuple[IPv4Network, ...]


def encode_access(config: AccessConfig, limit: int = MAX_PIECE) -> tuple[bytes, int]:
    """The accepted-login datagram, and how many routes did not fit in `limit` bytes."""
    text = f"addr {config.address},peer {config.peer},mtu {config.mtu}"
    left_out = 0
    for route in config.routes:
        more = f",route {route}"
        if 1 + len(text) + len(more) > limit:
            left_out += 1
            continue
        text += more
    return bytes((ACCEPTED,)) + text.encode("ascii"), left_out


def decode_access(datagram: bytes) -> AccessConfig:
    """The accepted-login datagram read back; WireError if it is not one."""
    if len(datagram) < 2 or datagram[0] != ACCEPTED:
        raise WireError("not an accepted-login reply")
    fields: dict[str, list[str]] = {}
    try:
        text = datagram[1:].decode("ascii")
        for item in text.split(","):
            key, _, value = item.strip().partition(" ")
            fields.setdefault(key, []).append(value.strip())
        (addr,), (peer,), (mtu,) = fields["addr"], fields["peer"], fields["mtu"]
        return AccessConfig(IPv4Interface(addr), IPv4Address(peer), int(mtu),
                            tuple(IPv4Network(r) for r in fields.get("route", [])))
    except (UnicodeDecodeError, KeyError, ValueError) as exc:
        raise WireError(f"bad accepted-login reply: {exc}") from None
