"""ctun wire protocol, version 1: frames, handshake, AEAD and replay window.

Pure functions and small value objects: no sockets, no clocks (callers pass the time in).
docs/protocol.md describes the format byte by byte; keep the two in step.

Receive-path order (callers rely on it): length and type -> session -> AEAD -> replay ->
inner packet sanity. Every failure raises Dropped with a reason from Drop, and nothing in
this module ever produces a reply to a frame that failed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1


class FrameType(enum.IntEnum):
    INIT = 1
    RESPONSE = 2
    DATA = 3
    KEEPALIVE = 4
    CONTROL = 5
    CLOSE = 6
    DATA_GSO = 7  # an offload super-packet with its header (core/gso.py); negotiated


TRANSPORT_TYPES = frozenset(
    {FrameType.DATA, FrameType.KEEPALIVE, FrameType.CONTROL, FrameType.CLOSE,
     FrameType.DATA_GSO}
)
# A dict lookup, not FrameType(byte): this runs for every frame and the enum call is slow.
_FRAME_TYPES = {int(t): t for t in FrameType}


class Drop(enum.StrEnum):
    """Why a frame or packet was dropped; the value is the counter's name."""

    SHORT = "short"
    UNKNOWN_TYPE = "unknown_type"
    MALFORMED = "malformed"
    OVERSIZE = "oversize"
    UNKNOWN_PEER = "unknown_peer"
    BAD_MAC = "bad_mac"
    STALE_HANDSHAKE = "stale_handshake"
    CLOCK_SKEW = "clock_skew"
    BAD_KEY_SHARE = "bad_key_share"
    UNKNOWN_SESSION = "unknown_session"
    AUTH_FAILED = "auth_failed"
    REPLAY = "replay"
    KEY_EXPIRED = "key_expired"
    RATE_LIMITED = "rate_limited"
    INNER_MALFORMED = "inner_malformed"
    INNER_NOT_IPV4 = "inner_not_ipv4"
    INNER_TOO_BIG = "inner_too_big"
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    CONTROL_INVALID = "control_invalid"
    NO_PEER = "no_peer"
    NO_SESSION = "no_session"
    GSO_UNSUPPORTED = "gso_unsupported"
    NOT_EXPOSED = "not_exposed"  # relay: an accessor's packet outside the exposed routes
    LOGIN_RATE_LIMITED = "login_rate_limited"  # INIT from an address out of failed logins
    WRONG_LISTENER = "wrong_listener"  # an accessor not at the expose listener, or the VM at it


class Dropped(Exception):
    """Raised on the receive path; carries the reason and nothing an attacker could read."""

    def __init__(self, reason: Drop) -> None:
        super().__init__(reason.value)
        self.reason = reason


KEY_LEN = 32
TAG_LEN = 16
KEY_ID_LEN = 8

# Handshake initiation: type, version, 2 reserved, sender index, key id, ephemeral, time, mac.
_INIT = struct.Struct(">BBHI8s32sQ")
INIT_BODY_LEN = _INIT.size  # 56
INIT_LEN = INIT_BODY_LEN + TAG_LEN  # 72

# Handshake response: type, version, 2 reserved, sender index, receiver index, ephemeral, tag.
_RESPONSE = struct.Struct(">BBHII32s")
RESPONSE_BODY_LEN = _RESPONSE.size  # 44
RESPONSE_LEN = RESPONSE_BODY_LEN + TAG_LEN  # 60

# Transport frames: type, 3 reserved, receiver index, 64-bit counter; then ciphertext + tag.
_HEADER = struct.Struct(">B3xIQ")
HEADER_LEN = _HEADER.size  # 16
TRANSPORT_OVERHEAD = HEADER_LEN + TAG_LEN  # 32
MIN_FRAME = TRANSPORT_OVERHEAD  # a keepalive, the smallest valid frame

# Largest inner payload ever accepted (an IPv4 packet cannot be larger).
MAX_PAYLOAD = 65535 + 10  # the largest IPv4 packet, after an offload header (core/gso.py)
MAX_FRAME = TRANSPORT_OVERHEAD + MAX_PAYLOAD

REPLAY_WINDOW = 2048
# WireGuard's limits: rekey long before the 64-bit nonce could wrap, never use a key past them.
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

_NONCE_PAD = b"\x00\x00\x00\x00"
_ZERO_NONCE = bytes(12)
_KEYS_INFO = b"ctun-v1 session keys"


def key_id(psk: bytes) -> bytes:
    """A short public name for a pre-shared key, so the responder finds it without trying all."""
    return hashlib.blake2s(b"ctun-v1 key id", key=psk, digest_size=KEY_ID_LEN).digest()


def _mac_key(psk: bytes) -> bytes:
    return hashlib.blake2s(b"ctun-v1 init mac", key=psk).digest()


def _init_mac(psk: bytes, body: bytes) -> bytes:
    return hashlib.blake2s(body, key=_mac_key(psk), digest_size=TAG_LEN).digest()


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


@dataclass(frozen=True)
class SessionKeys:
    """Keys for one session, from one side's point of view."""

    send: bytes
    receive: bytes
    local_index: int
    remote_index: int


def _derive(psk: bytes, shared: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes]:
    # The transcript binds both ephemerals and both indices; the psk authenticates the keys.
    info = _KEYS_INFO + hashlib.blake2s(transcript).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=psk, info=info).derive(shared)
    return okm[:32], okm[32:64], okm[64:]


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # low-order point: the shared secret would be all zeros
        raise Dropped(Drop.BAD_KEY_SHARE) from None


# --- handshake: initiator side ----------------------------------------------------------


@dataclass
class PendingInit:
    """What the initiator keeps between sending an initiation and receiving the response."""

    psk: bytes
    local_index: int
    message: bytes
    ephemeral: X25519PrivateKey = field(repr=False)


def create_init(psk: bytes, local_index: int, now_ns: int) -> PendingInit:
    """Build a handshake initiation; `now_ns` (wall clock) lets the responder refuse replays."""
    ephemeral = X25519PrivateKey.generate()
    body = _INIT.pack(
        FrameType.INIT, VERSION, 0, local_index, key_id(psk), _public_bytes(ephemeral), now_ns
    )
    return PendingInit(psk, local_index, body + _init_mac(psk, body), ephemeral)


def consume_response(pending: PendingInit, frame: bytes) -> SessionKeys:
    """Check a response against the initiation it answers; return the initiator's keys."""
    response = parse_response(frame)
    if response.receiver_index != pending.local_index:
        raise Dropped(Drop.UNKNOWN_SESSION)
    shared = _exchange(pending.ephemeral, response.ephemeral)
    transcript = pending.message + frame[:RESPONSE_BODY_LEN]
    i2r, r2i, confirm = _derive(pending.psk, shared, transcript)
    try:
        ChaCha20Poly1305(confirm).decrypt(_ZERO_NONCE, response.tag, transcript)
    except InvalidTag:
        raise Dropped(Drop.AUTH_FAILED) from None
    return SessionKeys(i2r, r2i, pending.local_index, response.sender_index)


# --- handshake: responder side ----------------------------------------------------------


@dataclass(frozen=True)
class InitMessage:
    sender_index: int
    key_id: bytes
    ephemeral: bytes
    timestamp_ns: int
    raw: bytes


def parse_init(frame: bytes) -> InitMessage:
    """Structure only; the MAC is checked by verify_init once the key id names a peer."""
    if len(frame) != INIT_LEN:
        raise Dropped(Drop.SHORT if len(frame) < INIT_LEN else Drop.MALFORMED)
    ftype, version, reserved, sender, kid, eph, ts = _INIT.unpack_from(frame)
    if ftype != FrameType.INIT or version != VERSION or reserved != 0:
        raise Dropped(Drop.MALFORMED)
    return InitMessage(sender, kid, eph, ts, bytes(frame))


def verify_init(message: InitMessage, psk: bytes) -> None:
    expected = _init_mac(psk, message.raw[:INIT_BODY_LEN])
    if not hmac.compare_digest(expected, message.raw[INIT_BODY_LEN:]):
        raise Dropped(Drop.BAD_MAC)


def check_init_freshness(
    message: InitMessage, last_accepted_ns: int, now_ns: int, max_skew_ns: int
) -> None:
    """Refuse a replayed or out-of-date initiation before spending a key exchange on it."""
    if message.timestamp_ns <= last_accepted_ns:
        raise Dropped(Drop.STALE_HANDSHAKE)
    if abs(message.timestamp_ns - now_ns) > max_skew_ns:
        raise Dropped(Drop.CLOCK_SKEW)


def create_response(
    message: InitMessage, psk: bytes, local_index: int
) -> tuple[bytes, SessionKeys]:
    """Answer a verified initiation; the response is smaller than the initiation it answers."""
    ephemeral = X25519PrivateKey.generate()
    shared = _exchange(ephemeral, message.ephemeral)
    body = _RESPONSE.pack(
        FrameType.RESPONSE, VERSION, 0, local_index, message.sender_index, _public_bytes(ephemeral)
    )
    transcript = message.raw + body
    i2r, r2i, confirm = _derive(psk, shared, transcript)
    tag = ChaCha20Poly1305(confirm).encrypt(_ZERO_NONCE, b"", transcript)
    return body + tag, SessionKeys(r2i, i2r, local_index, message.sender_index)


@dataclass(frozen=True)
class ResponseMessage:
    sender_index: int
    receiver_index: int
    ephemeral: bytes
    tag: bytes


def parse_response(frame: bytes) -> ResponseMessage:
    if len(frame) != RESPONSE_LEN:
        raise Dropped(Drop.SHORT if len(frame) < RESPONSE_LEN else Drop.MALFORMED)
    ftype, version, reserved, sender, receiver, eph = _RESPONSE.unpack_from(frame)
    if ftype != FrameType.RESPONSE or version != VERSION or reserved != 0:
        raise Dropped(Drop.MALFORMED)
    return ResponseMessage(sender, receiver, eph, bytes(frame[RESPONSE_BODY_LEN:]))


# --- transport frames -------------------------------------------------------------------


def frame_type(frame: bytes) -> FrameType:
    """First check on every received frame: its length fits its type."""
    if not frame:
        raise Dropped(Drop.SHORT)
    ftype = _FRAME_TYPES.get(frame[0])
    if ftype is None:
        raise Dropped(Drop.UNKNOWN_TYPE)
    if ftype in TRANSPORT_TYPES:
        if len(frame) < MIN_FRAME:
            raise Dropped(Drop.SHORT)
        if len(frame) > MAX_FRAME:
            raise Dropped(Drop.OVERSIZE)
        if frame[1:4] != b"\x00\x00\x00":
            raise Dropped(Drop.MALFORMED)
    return ftype


def receiver_index(frame: bytes) -> int:
    """The session a transport frame is for; call after frame_type() accepted it."""
    return int.from_bytes(frame[4:8], "big")


class ReplayWindow:
    """Sliding window of REPLAY_WINDOW counters: accepts each counter at most once."""

    __slots__ = ("_bits", "highest")

    def __init__(self) -> None:
        self.highest = -1
        self._bits = 0  # bit i set: counter (highest - i) was seen

    def accept(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self.highest:
            shift = counter - self.highest
            # A jump past the window forgets everything; shifting by it would allocate it.
            if shift >= REPLAY_WINDOW:
                self._bits = 1
            else:
                self._bits = ((self._bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = counter
            return True
        offset = self.highest - counter
        if offset >= REPLAY_WINDOW or (self._bits >> offset) & 1:
            return False
        self._bits |= 1 << offset
        return True


class Sealer:
    """Encrypts frames for one session; safe to call from several threads."""

    __slots__ = ("_aead", "_counter", "_remote_index", "sent")

    def __init__(self, key: bytes, remote_index: int) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._remote_index = remote_index
        # next() on itertools.count is atomic under the GIL: no nonce is ever used twice.
        self._counter = itertools.count()
        self.sent = 0

    def seal(self, ftype: FrameType, payload: bytes) -> bytes:
        counter = next(self._counter)
        if counter >= REJECT_AFTER_MESSAGES:
            raise Dropped(Drop.KEY_EXPIRED)
        self.sent = counter + 1
        header = _HEADER.pack(ftype, self._remote_index, counter)
        return header + self._aead.encrypt(_NONCE_PAD + header[8:], payload, header)


class Opener:
    """Decrypts frames for one session and refuses replays. Single receive thread only."""

    __slots__ = ("_aead", "window")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.window = ReplayWindow()

    def open(self, frame: bytes) -> bytes:
        """AEAD first, then replay: an attacker cannot move the window with forged counters."""
        if len(frame) < MIN_FRAME:
            raise Dropped(Drop.SHORT)
        header = frame[:HEADER_LEN]
        try:
            payload = self._aead.decrypt(_NONCE_PAD + header[8:], frame[HEADER_LEN:], header)
        except InvalidTag:
            raise Dropped(Drop.AUTH_FAILED) from None
        if not self.window.accept(int.from_bytes(header[8:16], "big")):
            raise Dropped(Drop.REPLAY)
        return payload


# --- inner packets ----------------------------------------------------------------------


class Prefixes:
    """A set of IPv4 networks tested by integer masks (fast enough for every packet)."""

    __slots__ = ("_nets",)

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | str] = ()) -> None:
        nets: list[tuple[int, int]] = []
        for net in networks:
            n = ipaddress.IPv4Network(net)
            nets.append((int(n.network_address), int(n.netmask)))
        # Longest prefix first, so lookups that want the most specific match get it.
        nets.sort(key=lambda nm: -nm[1])
        self._nets = tuple(nets)

    def __contains__(self, address: int) -> bool:
        return any(address & mask == net for net, mask in self._nets)

    def __bool__(self) -> bool:
        return bool(self._nets)

    def longest_match(self, address: int) -> int:
        """Prefix length of the most specific network holding `address`, or -1."""
        for net, mask in self._nets:
            if address & mask == net:
                return mask.bit_count()
        return -1


def check_inner(packet: bytes, allowed_sources: Prefixes, mtu: int) -> None:
    """Sanity of a decrypted IP packet before it may reach the interface."""
    size = len(packet)
    if size < 20:
        raise Dropped(Drop.INNER_MALFORMED)
    first = packet[0]
    if first >> 4 != 4:
        raise Dropped(Drop.INNER_NOT_IPV4)
    header_len = (first & 0x0F) * 4
    if header_len < 20 or header_len > size or int.from_bytes(packet[2:4], "big") != size:
        raise Dropped(Drop.INNER_MALFORMED)
    if size > mtu:
        raise Dropped(Drop.INNER_TOO_BIG)
    if int.from_bytes(packet[12:16], "big") not in allowed_sources:
        raise Dropped(Drop.SOURCE_NOT_ALLOWED)


def ipv4_destination(packet: bytes, offset: int = 0) -> int | None:
    """Destination of an outgoing IPv4 packet that starts at `offset` (after an offload
    header), or None when it is not one we can route."""
    if len(packet) < offset + 20 or packet[offset] >> 4 != 4:
        return None
    return int.from_bytes(packet[offset + 16:offset + 20], "big")
