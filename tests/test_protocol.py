"""Wire protocol v1 and control messages: pure unit and property tests (no root, no sockets).

The reference helpers below re-derive key ids, MACs, keys and nonces from the description in
docs/protocol.md rather than from the module's private functions, so the document and the code
are checked against each other.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import struct
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from ctun.core import messages
from ctun.core.protocol import (
    HEADER_LEN,
    INIT_BODY_LEN,
    INIT_LEN,
    MAX_FRAME,
    MAX_PAYLOAD,
    MIN_FRAME,
    REJECT_AFTER_MESSAGES,
    REPLAY_WINDOW,
    RESPONSE_BODY_LEN,
    RESPONSE_LEN,
    TAG_LEN,
    TRANSPORT_OVERHEAD,
    TRANSPORT_TYPES,
    VERSION,
    Drop,
    Dropped,
    FrameType,
    Opener,
    PendingInit,
    Prefixes,
    ReplayWindow,
    Sealer,
    SessionKeys,
    check_init_freshness,
    check_inner,
    consume_response,
    create_init,
    create_response,
    frame_type,
    ipv4_destination,
    key_id,
    parse_init,
    parse_response,
    receiver_index,
    verify_init,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PSK = bytes(range(32))
OTHER_PSK = bytes(range(100, 132))
NOW = 1_700_000_000 * 10**9  # wall clock, ns
SKEW = 600 * 10**9
INIT_INDEX = 0x01020304
RESP_INDEX = 0xA0B0C0D0
KEY = bytes(range(7, 39))

# Cheap parsers get many examples; anything doing X25519/AEAD gets fewer and no deadline.
FAST = settings(max_examples=150, deadline=None)
CRYPTO = settings(max_examples=100, deadline=None)

# u-coordinates whose X25519 shared secret is all zeros (RFC 7748 section 6.1's check).
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
    (2**255 - 19 + 1).to_bytes(32, "little"),
]


# --- reference implementations, written from docs/protocol.md ---------------------------


def ref_key_id(psk: bytes) -> bytes:
    return hashlib.blake2s(b"ctun-v1 key id", key=psk, digest_size=8).digest()


def ref_init_mac(psk: bytes, body: bytes) -> bytes:
    mac_key = hashlib.blake2s(b"ctun-v1 init mac", key=psk).digest()
    return hashlib.blake2s(body, key=mac_key, digest_size=16).digest()


def ref_derive(psk: bytes, shared: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes]:
    info = b"ctun-v1 session keys" + hashlib.blake2s(transcript).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=psk, info=info).derive(shared)
    return okm[:32], okm[32:64], okm[64:]


def ref_nonce(counter: int) -> bytes:
    return b"\x00" * 4 + counter.to_bytes(8, "big")


def craft_init(
    psk: bytes,
    ephemeral: bytes,
    index: int = INIT_INDEX,
    timestamp: int = NOW,
    ftype: int = 1,
    version: int = 1,
    reserved: int = 0,
) -> bytes:
    body = struct.pack(
        ">BBHI8s32sQ", ftype, version, reserved, index, ref_key_id(psk), ephemeral, timestamp
    )
    return body + ref_init_mac(psk, body)


def transport_header(ftype: int, index: int, counter: int) -> bytes:
    return bytes([ftype, 0, 0, 0]) + index.to_bytes(4, "big") + counter.to_bytes(8, "big")


def ipv4_packet(
    src: str = "10.1.0.2",
    dst: str = "172.17.0.2",
    payload: bytes = b"ping" * 5,
    ihl: int = 5,
    version: int = 4,
    total: int | None = None,
) -> bytes:
    options = bytes(4 * (ihl - 5)) if ihl > 5 else b""
    size = 20 + len(options) + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        (version << 4) | ihl,
        0,
        size if total is None else total,
        0x1234,
        0,
        64,
        1,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + payload


def handshake(
    psk: bytes = PSK, init_index: int = INIT_INDEX, resp_index: int = RESP_INDEX
) -> tuple[PendingInit, bytes, SessionKeys, SessionKeys]:
    pending = create_init(psk, init_index, NOW)
    message = parse_init(pending.message)
    verify_init(message, psk)
    check_init_freshness(message, 0, NOW, SKEW)
    response, responder = create_response(message, psk, resp_index)
    initiator = consume_response(pending, response)
    return pending, response, initiator, responder


def reason(exc: pytest.ExceptionInfo[Dropped]) -> Drop:
    return exc.value.reason


# --- handshake ---------------------------------------------------------------------------


def test_sizes() -> None:
    assert (INIT_BODY_LEN, INIT_LEN) == (56, 72)
    assert (RESPONSE_BODY_LEN, RESPONSE_LEN) == (44, 60)
    assert (HEADER_LEN, TAG_LEN, TRANSPORT_OVERHEAD, MIN_FRAME) == (16, 16, 32, 32)
    # The largest IPv4 packet after a 10-byte offload header.
    assert MAX_FRAME == 32 + 10 + 65535 == TRANSPORT_OVERHEAD + MAX_PAYLOAD
    assert RESPONSE_LEN < INIT_LEN  # no amplification: the answer is smaller than the question
    assert [int(t) for t in FrameType] == [1, 2, 3, 4, 5, 6, 7]
    assert {t.name for t in TRANSPORT_TYPES} == {"DATA", "KEEPALIVE", "CONTROL", "CLOSE",
                                                  "DATA_GSO"}


def test_handshake_round_trip() -> None:
    pending, response, initiator, responder = handshake()
    assert len(pending.message) == INIT_LEN == 72
    assert len(response) == RESPONSE_LEN == 60
    assert len(response) < len(pending.message)
    assert initiator.send == responder.receive
    assert initiator.receive == responder.send
    assert initiator.send != initiator.receive
    assert all(len(k) == 32 for k in (initiator.send, initiator.receive))
    assert (initiator.local_index, initiator.remote_index) == (INIT_INDEX, RESP_INDEX)
    assert (responder.local_index, responder.remote_index) == (RESP_INDEX, INIT_INDEX)


def test_two_handshakes_give_different_keys() -> None:
    _, _, first, _ = handshake()
    _, _, second, _ = handshake()
    assert {first.send, first.receive}.isdisjoint({second.send, second.receive})


def test_init_layout_matches_the_document() -> None:
    pending = create_init(PSK, INIT_INDEX, NOW)
    frame = pending.message
    assert frame[0] == FrameType.INIT.value == 1
    assert frame[1] == VERSION == 1
    assert frame[2:4] == b"\x00\x00"
    assert frame[4:8] == INIT_INDEX.to_bytes(4, "big")
    assert frame[8:16] == ref_key_id(PSK) == key_id(PSK)
    assert frame[16:48] == pending.ephemeral.public_key().public_bytes_raw()
    assert frame[48:56] == NOW.to_bytes(8, "big")
    assert frame[56:72] == ref_init_mac(PSK, frame[:56])
    message = parse_init(frame)
    assert (message.sender_index, message.key_id, message.timestamp_ns) == (
        INIT_INDEX,
        ref_key_id(PSK),
        NOW,
    )
    assert message.ephemeral == frame[16:48]
    assert message.raw == frame


def test_response_layout_and_key_derivation_match_the_document() -> None:
    pending, response, initiator, responder = handshake()
    assert response[0] == FrameType.RESPONSE.value == 2
    assert response[1] == VERSION
    assert response[2:4] == b"\x00\x00"
    assert response[4:8] == RESP_INDEX.to_bytes(4, "big")
    assert response[8:12] == INIT_INDEX.to_bytes(4, "big")
    parsed = parse_response(response)
    assert (parsed.sender_index, parsed.receiver_index) == (RESP_INDEX, INIT_INDEX)
    assert parsed.ephemeral == response[12:44]
    assert parsed.tag == response[44:60]
    shared = pending.ephemeral.exchange(X25519PublicKey.from_public_bytes(response[12:44]))
    transcript = pending.message + response[:44]
    i2r, r2i, confirm = ref_derive(PSK, shared, transcript)
    assert (initiator.send, initiator.receive) == (i2r, r2i)
    assert (responder.send, responder.receive) == (r2i, i2r)
    # The confirm tag: ChaCha20-Poly1305 under the third key, zero nonce, empty plaintext,
    # the transcript as associated data.
    assert ChaCha20Poly1305(confirm).encrypt(bytes(12), b"", transcript) == response[44:]


def test_transport_frames_open_on_the_other_side_for_every_type() -> None:
    _, _, initiator, responder = handshake()
    i_sealer, i_opener = Sealer(initiator.send, initiator.remote_index), Opener(initiator.receive)
    r_sealer, r_opener = Sealer(responder.send, responder.remote_index), Opener(responder.receive)
    payloads = {
        FrameType.DATA: ipv4_packet(),
        FrameType.KEEPALIVE: (123456789).to_bytes(8, "big"),
        FrameType.CONTROL: messages.encode("ack", 1),
        FrameType.CLOSE: b"",
        FrameType.DATA_GSO: bytes(10) + ipv4_packet(),
    }
    assert set(payloads) == TRANSPORT_TYPES
    for counter, (ftype, payload) in enumerate(payloads.items()):
        frame = i_sealer.seal(ftype, payload)
        assert len(frame) == len(payload) + TRANSPORT_OVERHEAD
        assert frame_type(frame) is ftype
        assert receiver_index(frame) == RESP_INDEX
        assert frame[:16] == transport_header(ftype, RESP_INDEX, counter)
        assert r_opener.open(frame) == payload
        back = r_sealer.seal(ftype, payload)
        assert receiver_index(back) == INIT_INDEX
        assert i_opener.open(back) == payload
    assert i_sealer.sent == r_sealer.sent == len(payloads)


def test_transport_nonce_and_aad_match_the_document() -> None:
    sealer = Sealer(KEY, 0xDEADBEEF)
    for counter in range(3):
        frame = sealer.seal(FrameType.DATA, b"payload %d" % counter)
        assert frame[8:16] == counter.to_bytes(8, "big")
        plain = ChaCha20Poly1305(KEY).decrypt(ref_nonce(counter), frame[16:], frame[:16])
        assert plain == b"payload %d" % counter


def test_frames_do_not_open_in_the_wrong_direction_or_session() -> None:
    _, _, initiator, responder = handshake()
    _, _, other, _ = handshake()
    frame = Sealer(initiator.send, initiator.remote_index).seal(FrameType.DATA, b"x" * 20)
    for key in (initiator.receive, other.receive, other.send):  # reflected, other session
        with pytest.raises(Dropped) as exc:
            Opener(key).open(frame)
        assert reason(exc) is Drop.AUTH_FAILED
    assert Opener(responder.receive).open(frame) == b"x" * 20


# --- handshake failures ------------------------------------------------------------------


def test_wrong_psk_init_is_bad_mac() -> None:
    pending = create_init(PSK, INIT_INDEX, NOW)
    assert key_id(PSK) != key_id(OTHER_PSK)
    with pytest.raises(Dropped) as exc:
        verify_init(parse_init(pending.message), OTHER_PSK)
    assert reason(exc) is Drop.BAD_MAC


def test_response_under_another_psk_is_auth_failed() -> None:
    pending = create_init(PSK, INIT_INDEX, NOW)
    # A responder that (wrongly) skips verify_init and answers with a different psk.
    response, _ = create_response(parse_init(pending.message), OTHER_PSK, RESP_INDEX)
    with pytest.raises(Dropped) as exc:
        consume_response(pending, response)
    assert reason(exc) is Drop.AUTH_FAILED


def test_response_for_another_init_is_refused() -> None:
    first = create_init(PSK, INIT_INDEX, NOW)
    second = create_init(PSK, INIT_INDEX + 1, NOW + 1)
    response, _ = create_response(parse_init(first.message), PSK, RESP_INDEX)
    with pytest.raises(Dropped) as exc:
        consume_response(second, response)
    assert reason(exc) is Drop.UNKNOWN_SESSION
    # Same index, different initiation (different ephemeral and transcript): the tag fails.
    third = create_init(PSK, INIT_INDEX, NOW + 2)
    with pytest.raises(Dropped) as exc:
        consume_response(third, response)
    assert reason(exc) is Drop.AUTH_FAILED
    assert consume_response(first, response).remote_index == RESP_INDEX


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p[:2].hex() + p[-1:].hex())
def test_low_order_key_share_in_init(point: bytes) -> None:
    frame = craft_init(PSK, point)
    message = parse_init(frame)
    verify_init(message, PSK)  # the MAC is valid: the key share itself is what is refused
    with pytest.raises(Dropped) as exc:
        create_response(message, PSK, RESP_INDEX)
    assert reason(exc) is Drop.BAD_KEY_SHARE


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p[:2].hex() + p[-1:].hex())
def test_low_order_key_share_in_response(point: bytes) -> None:
    pending = create_init(PSK, INIT_INDEX, NOW)
    frame = struct.pack(">BBHII32s", 2, 1, 0, RESP_INDEX, INIT_INDEX, point) + bytes(16)
    with pytest.raises(Dropped) as exc:
        consume_response(pending, frame)
    assert reason(exc) is Drop.BAD_KEY_SHARE


def test_crafted_init_with_valid_key_share_is_answered() -> None:
    """craft_init is faithful: with a real key share the same construction is accepted."""
    ephemeral = X25519PrivateKey.generate()
    frame = craft_init(PSK, ephemeral.public_key().public_bytes_raw())
    message = parse_init(frame)
    verify_init(message, PSK)
    response, responder = create_response(message, PSK, RESP_INDEX)
    keys = consume_response(PendingInit(PSK, INIT_INDEX, frame, ephemeral), response)
    assert keys.send == responder.receive


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ftype": 2}, Drop.MALFORMED),
        ({"version": 0}, Drop.MALFORMED),
        ({"version": 2}, Drop.MALFORMED),
        ({"reserved": 1}, Drop.MALFORMED),
    ],
)
def test_init_header_fields(fields: dict[str, int], expected: Drop) -> None:
    frame = craft_init(PSK, bytes(range(32)), **fields)
    with pytest.raises(Dropped) as exc:
        parse_init(frame)
    assert reason(exc) is expected


def test_handshake_lengths() -> None:
    pending = create_init(PSK, INIT_INDEX, NOW)
    response, _ = create_response(parse_init(pending.message), PSK, RESP_INDEX)
    for parse, frame in ((parse_init, pending.message), (parse_response, response)):
        for cut in (0, 1, len(frame) - 1):
            with pytest.raises(Dropped) as exc:
                parse(frame[:cut])
            assert reason(exc) is Drop.SHORT
        with pytest.raises(Dropped) as exc:
            parse(frame + b"\x00")
        assert reason(exc) is Drop.MALFORMED


# --- freshness ---------------------------------------------------------------------------


def test_init_freshness() -> None:
    message = parse_init(create_init(PSK, INIT_INDEX, NOW).message)
    check_init_freshness(message, NOW - 1, NOW, SKEW)
    check_init_freshness(message, 0, NOW + SKEW, SKEW)  # exactly at the limit: accepted
    check_init_freshness(message, 0, NOW - SKEW, SKEW)
    for last in (NOW, NOW + 1, NOW + 10**12):  # replayed (equal) or older than the last one
        with pytest.raises(Dropped) as exc:
            check_init_freshness(message, last, NOW, SKEW)
        assert reason(exc) is Drop.STALE_HANDSHAKE
    for now in (NOW + SKEW + 1, NOW - SKEW - 1, NOW + 10**15):
        with pytest.raises(Dropped) as exc:
            check_init_freshness(message, 0, now, SKEW)
        assert reason(exc) is Drop.CLOCK_SKEW
    # Stale is checked first.
    with pytest.raises(Dropped) as exc:
        check_init_freshness(message, NOW, NOW + 2 * SKEW, SKEW)
    assert reason(exc) is Drop.STALE_HANDSHAKE


# --- tampering: every byte, every bit ----------------------------------------------------

MASKS = (0xFF, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)


def flipped(frame: bytes, position: int, mask: int) -> bytes:
    out = bytearray(frame)
    out[position] ^= mask
    return bytes(out)


def test_every_flip_of_a_data_frame_is_refused() -> None:
    sealer = Sealer(KEY, RESP_INDEX)
    sealer.seal(FrameType.DATA, b"")  # counter 0
    frame = sealer.seal(FrameType.DATA, ipv4_packet())  # counter 1, non-zero counter bytes
    opener = Opener(KEY)
    for position, mask in itertools.product(range(len(frame)), MASKS):
        bad = flipped(frame, position, mask)
        if position == 0 and mask == 0xFF:
            with pytest.raises(Dropped) as exc:
                frame_type(bad)
            assert reason(exc) is Drop.UNKNOWN_TYPE
        elif 1 <= position <= 3:
            with pytest.raises(Dropped) as exc:
                frame_type(bad)
            assert reason(exc) is Drop.MALFORMED
        elif 4 <= position <= 7:
            assert receiver_index(bad) != RESP_INDEX  # the receiver would not find a session
        # Whatever a cheaper check said, the AEAD refuses it too: the whole header is the AAD.
        with pytest.raises(Dropped) as exc:
            opener.open(bad)
        assert reason(exc) is Drop.AUTH_FAILED, (position, mask)
    assert opener.window.highest == -1  # forgeries never move the window
    assert opener.open(frame) == ipv4_packet()


def test_every_flip_of_an_init_is_refused() -> None:
    frame = create_init(PSK, INIT_INDEX, NOW).message
    for position, mask in itertools.product(range(len(frame)), MASKS):
        bad = flipped(frame, position, mask)
        with pytest.raises(Dropped) as exc:
            verify_init(parse_init(bad), PSK)
        expected = Drop.MALFORMED if position < 4 else Drop.BAD_MAC
        assert reason(exc) is expected, (position, mask)
        if 8 <= position < 16:
            assert parse_init(bad).key_id != key_id(PSK)  # would be unknown_peer first


def test_every_flip_of_a_response_is_refused() -> None:
    pending = create_init(PSK, INIT_INDEX, NOW)
    response, _ = create_response(parse_init(pending.message), PSK, RESP_INDEX)
    for position, mask in itertools.product(range(len(response)), MASKS):
        bad = flipped(response, position, mask)
        with pytest.raises(Dropped) as exc:
            consume_response(pending, bad)
        if position < 4:
            allowed = {Drop.MALFORMED}
        elif 8 <= position < 12:
            allowed = {Drop.UNKNOWN_SESSION}
        elif 12 <= position < 44:
            allowed = {Drop.AUTH_FAILED, Drop.BAD_KEY_SHARE}
        else:
            allowed = {Drop.AUTH_FAILED}
        assert reason(exc) in allowed, (position, mask)
    assert consume_response(pending, response).remote_index == RESP_INDEX


# --- replay window -----------------------------------------------------------------------


def test_replay_window_edge() -> None:
    window = ReplayWindow()
    assert window.accept(5000)
    assert window.accept(5000 - (REPLAY_WINDOW - 1))  # oldest counter still in the window
    assert not window.accept(5000 - (REPLAY_WINDOW - 1))  # ... accepted once only
    assert not window.accept(5000 - REPLAY_WINDOW)  # just outside
    assert not window.accept(0)
    assert not window.accept(5000)
    assert window.highest == 5000


def test_replay_window_duplicates_and_reordering() -> None:
    window = ReplayWindow()
    assert window.accept(0)
    assert not window.accept(0)
    assert window.accept(10)
    for counter in (5, 7, 3, 9, 1):
        assert window.accept(counter)
        assert not window.accept(counter)
    assert window.accept(11)
    assert not window.accept(10)
    assert window.highest == 11


def test_replay_window_jumps() -> None:
    window = ReplayWindow()
    assert window.accept(3)
    assert window.accept(3 + REPLAY_WINDOW - 1)  # old highest now at the window's far edge
    assert not window.accept(3)
    assert window.accept(4)
    window = ReplayWindow()
    assert window.accept(3)
    assert window.accept(3 + REPLAY_WINDOW)  # old highest falls out
    assert not window.accept(3)
    jump = 1 << 20
    assert window.accept(jump)
    assert window.accept(jump - 1)
    assert window.accept(jump - (REPLAY_WINDOW - 1))
    assert not window.accept(jump - REPLAY_WINDOW)
    assert not window.accept(3 + REPLAY_WINDOW)
    assert window.accept(jump + 1)


def test_replay_window_first_counter_may_be_anything() -> None:
    for first in (0, 1, 4095, REJECT_AFTER_MESSAGES - 1):
        window = ReplayWindow()
        assert window.accept(first)
        assert not window.accept(first)


def test_replay_window_reject_after() -> None:
    window = ReplayWindow()
    for counter in (REJECT_AFTER_MESSAGES, REJECT_AFTER_MESSAGES + 1, 2**64 - 1, 2**64, 2**70):
        assert not window.accept(counter)
    assert window.highest == -1


def test_replay_window_huge_jump_is_cheap() -> None:
    window = ReplayWindow()
    assert window.accept(5)
    assert window.accept(1 << 60)  # allowed: below REJECT_AFTER_MESSAGES
    assert not window.accept(5)
    assert window.accept(REJECT_AFTER_MESSAGES - 1)
    assert window.accept(REJECT_AFTER_MESSAGES - 2)
    assert not window.accept(REJECT_AFTER_MESSAGES)


class ReferenceWindow:
    """The specification: each counter once, nothing more than WINDOW-1 below the highest."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = -1

    def accept(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES or counter in self.seen:
            return False
        if counter <= self.highest - REPLAY_WINDOW:
            return False
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return True


def _counters_from_steps(start: int, steps: list[tuple[int, int]]) -> list[int]:
    """Counters near the edges: small steps, steps around +-REPLAY_WINDOW, big jumps, repeats,
    and now and then a counter at REJECT_AFTER_MESSAGES."""
    out, current = [], start
    for kind, value in steps:
        step = {
            0: value % 7 - 3,
            1: -REPLAY_WINDOW + value % 5 - 2,
            2: REPLAY_WINDOW + value % 5 - 2,
            3: value,
            4: 1 << 16,
        }[kind]
        current = max(0, current + step)
        out.append(REJECT_AFTER_MESSAGES if kind == 0 and value % 50 == 0 else current)
    return out


counter_sequences = st.builds(
    _counters_from_steps,
    st.integers(0, 3 * REPLAY_WINDOW),
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(-5 * REPLAY_WINDOW, 5 * REPLAY_WINDOW)),
        min_size=1,
        max_size=60,
    ),
)


@settings(max_examples=150, deadline=None)
@given(counter_sequences)
def test_replay_window_matches_reference(counters: list[int]) -> None:
    window, reference = ReplayWindow(), ReferenceWindow()
    for counter in counters:
        assert window.accept(counter) == reference.accept(counter), counter
        assert window.highest == reference.highest


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3 * REPLAY_WINDOW), max_size=300))
def test_replay_window_matches_reference_dense(counters: list[int]) -> None:
    window, reference = ReplayWindow(), ReferenceWindow()
    for counter in counters:
        assert window.accept(counter) == reference.accept(counter), counter


def test_opener_refuses_replays_and_expired_counters() -> None:
    sealer, opener = Sealer(KEY, 1), Opener(KEY)
    frames = [sealer.seal(FrameType.DATA, b"%d" % i) for i in range(5)]
    for i in (3, 0, 4, 1, 2):  # reordered
        assert opener.open(frames[i]) == b"%d" % i
    for frame in frames:
        with pytest.raises(Dropped) as exc:
            opener.open(frame)
        assert reason(exc) is Drop.REPLAY
    # A genuinely sealed frame whose counter is at the limit: authentic, but never accepted.
    header = transport_header(FrameType.DATA, 1, REJECT_AFTER_MESSAGES)
    frame = header + ChaCha20Poly1305(KEY).encrypt(
        ref_nonce(REJECT_AFTER_MESSAGES), b"late", header
    )
    with pytest.raises(Dropped) as exc:
        Opener(KEY).open(frame)
    assert reason(exc) is Drop.REPLAY


def test_sealer_stops_at_reject_after() -> None:
    sealer = Sealer(KEY, 1)
    sealer._counter = itertools.count(REJECT_AFTER_MESSAGES - 1)  # skip ahead (test only)
    last = sealer.seal(FrameType.KEEPALIVE, b"")
    assert last[8:16] == (REJECT_AFTER_MESSAGES - 1).to_bytes(8, "big")
    for _ in range(2):
        with pytest.raises(Dropped) as exc:
            sealer.seal(FrameType.KEEPALIVE, b"")
        assert reason(exc) is Drop.KEY_EXPIRED
    assert Opener(KEY).open(last) == b""


def test_sealer_never_reuses_a_counter_across_threads() -> None:
    sealer = Sealer(KEY, 1)
    threads_n, per_thread = 4, 2000
    barrier = threading.Barrier(threads_n)
    results: list[list[bytes]] = [[] for _ in range(threads_n)]

    def work(out: list[bytes]) -> None:
        barrier.wait()
        for _ in range(per_thread):
            out.append(sealer.seal(FrameType.DATA, b"x"))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counters = [int.from_bytes(f[8:16], "big") for out in results for f in out]
    assert len(counters) == threads_n * per_thread
    assert sorted(counters) == list(range(threads_n * per_thread))
    # Each frame opens under its own counter's nonce.
    aead = ChaCha20Poly1305(KEY)
    for frame in results[0][:50] + results[-1][-50:]:
        counter = int.from_bytes(frame[8:16], "big")
        assert aead.decrypt(ref_nonce(counter), frame[16:], frame[:16]) == b"x"


# --- frame_type --------------------------------------------------------------------------


def test_frame_type_checks() -> None:
    cases: list[tuple[bytes, Drop]] = [
        (b"", Drop.SHORT),
        (b"\x00" + bytes(40), Drop.UNKNOWN_TYPE),
        (b"\x08" + bytes(40), Drop.UNKNOWN_TYPE),
        (b"\xff", Drop.UNKNOWN_TYPE),
        (b"\x03" + bytes(MIN_FRAME - 2), Drop.SHORT),
        (b"\x03" + bytes(MAX_FRAME), Drop.OVERSIZE),
        (b"\x03\x00\x01\x00" + bytes(40), Drop.MALFORMED),
        (b"\x06\x80\x00\x00" + bytes(40), Drop.MALFORMED),
    ]
    for frame, expected in cases:
        with pytest.raises(Dropped) as exc:
            frame_type(frame)
        assert reason(exc) is expected, frame[:4]
    assert frame_type(b"\x04" + bytes(MIN_FRAME - 1)) is FrameType.KEEPALIVE
    assert frame_type(b"\x03" + bytes(MAX_FRAME - 1)) is FrameType.DATA
    # Handshake frames are length-checked by their parsers, not here.
    assert frame_type(b"\x01") is FrameType.INIT
    assert frame_type(b"\x02\xff") is FrameType.RESPONSE


@FAST
@given(st.binary(max_size=80))
def test_frame_type_never_raises_anything_else(data: bytes) -> None:
    try:
        ftype = frame_type(data)
    except Dropped:
        return
    assert data[0] == ftype
    if ftype in TRANSPORT_TYPES:
        assert MIN_FRAME <= len(data) <= MAX_FRAME
        assert data[1:4] == b"\x00\x00\x00"


# --- parser properties -------------------------------------------------------------------

PENDING = create_init(PSK, INIT_INDEX, NOW)
GENUINE_RESPONSE, _ = create_response(parse_init(PENDING.message), PSK, RESP_INDEX)


def _with_prefix(prefix: bytes, length: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=length - len(prefix), max_size=length - len(prefix)).map(
        lambda rest: prefix + rest
    )


@CRYPTO
@given(st.one_of(st.binary(max_size=100), _with_prefix(b"\x01\x01\x00\x00", INIT_LEN)))
def test_parse_init_never_accepts_a_forgery(data: bytes) -> None:
    try:
        message = parse_init(data)
    except Dropped:
        return
    assert len(data) == INIT_LEN and data[:4] == b"\x01\x01\x00\x00"
    with pytest.raises(Dropped) as exc:
        verify_init(message, PSK)
    assert reason(exc) is Drop.BAD_MAC


@CRYPTO
@given(
    st.one_of(
        st.binary(max_size=100),
        _with_prefix(b"\x02\x01\x00\x00", RESPONSE_LEN),
        _with_prefix(
            b"\x02\x01\x00\x00" + RESP_INDEX.to_bytes(4, "big") + INIT_INDEX.to_bytes(4, "big"),
            RESPONSE_LEN,
        ),
        _with_prefix(GENUINE_RESPONSE[:44], RESPONSE_LEN),  # only the tag is random
    )
)
def test_parse_response_never_accepts_a_forgery(data: bytes) -> None:
    try:
        parse_response(data)
    except Dropped:
        return
    assert len(data) == RESPONSE_LEN and data[:4] == b"\x02\x01\x00\x00"
    if data == GENUINE_RESPONSE:
        return
    with pytest.raises(Dropped) as exc:
        consume_response(PENDING, data)
    assert reason(exc) in {Drop.UNKNOWN_SESSION, Drop.BAD_KEY_SHARE, Drop.AUTH_FAILED}


@CRYPTO
@given(
    ftype=st.sampled_from(sorted(TRANSPORT_TYPES)),
    index=st.integers(0, 2**32 - 1),
    counter=st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1)),
    body=st.binary(max_size=120),
)
def test_opener_never_accepts_a_forgery(
    ftype: FrameType, index: int, counter: int, body: bytes
) -> None:
    opener = Opener(KEY)
    frame = transport_header(ftype, index, counter) + body
    with pytest.raises(Dropped) as exc:
        opener.open(frame)
    assert reason(exc) is (Drop.SHORT if len(frame) < MIN_FRAME else Drop.AUTH_FAILED)
    assert opener.window.highest == -1


GENUINE_FRAME = Sealer(KEY, RESP_INDEX).seal(FrameType.CONTROL, messages.encode("ack", 7))


@CRYPTO
@given(
    position=st.integers(0, len(GENUINE_FRAME) - 1),
    mask=st.integers(1, 255),
    extra=st.binary(max_size=3),
    cut=st.integers(0, 3),
)
def test_opener_never_accepts_a_modified_frame(
    position: int, mask: int, extra: bytes, cut: int
) -> None:
    variants = [
        flipped(GENUINE_FRAME, position, mask),
        GENUINE_FRAME + extra,
        GENUINE_FRAME[: len(GENUINE_FRAME) - cut],
    ]
    for variant in variants:
        if variant == GENUINE_FRAME:
            continue
        with pytest.raises(Dropped) as exc:
            Opener(KEY).open(variant)
        assert reason(exc) is Drop.AUTH_FAILED


# --- inner packets -----------------------------------------------------------------------

ALLOWED = Prefixes(["10.1.0.0/16", "192.168.65.0/24"])
MTU = 1400


def test_check_inner_accepts_valid_ipv4() -> None:
    check_inner(ipv4_packet(), ALLOWED, MTU)
    check_inner(ipv4_packet(src="192.168.65.3", ihl=15), ALLOWED, MTU)
    check_inner(ipv4_packet(payload=b""), ALLOWED, MTU)  # a bare 20-byte header
    exact = ipv4_packet(payload=bytes(MTU - 20))
    check_inner(exact, ALLOWED, MTU)


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (b"", Drop.INNER_MALFORMED),
        (ipv4_packet()[:19], Drop.INNER_MALFORMED),
        (ipv4_packet(version=6), Drop.INNER_NOT_IPV4),
        (ipv4_packet(version=0), Drop.INNER_NOT_IPV4),
        (ipv4_packet(ihl=4), Drop.INNER_MALFORMED),
        (ipv4_packet(ihl=0), Drop.INNER_MALFORMED),
        (ipv4_packet(ihl=15, payload=b"")[:40], Drop.INNER_MALFORMED),  # IHL beyond the data
        (ipv4_packet(total=19), Drop.INNER_MALFORMED),
        (ipv4_packet() + b"\x00", Drop.INNER_MALFORMED),  # total length != size
        (ipv4_packet()[:-1], Drop.INNER_MALFORMED),
        (ipv4_packet(payload=bytes(MTU - 19)), Drop.INNER_TOO_BIG),
        (ipv4_packet(src="10.2.0.1"), Drop.SOURCE_NOT_ALLOWED),
        (ipv4_packet(src="192.168.66.1"), Drop.SOURCE_NOT_ALLOWED),
        (ipv4_packet(src="0.0.0.0"), Drop.SOURCE_NOT_ALLOWED),
    ],
    ids=lambda v: v.value if isinstance(v, Drop) else None,
)
def test_check_inner_refuses(packet: bytes, expected: Drop) -> None:
    with pytest.raises(Dropped) as exc:
        check_inner(packet, ALLOWED, MTU)
    assert reason(exc) is expected


def test_check_inner_with_no_allowed_sources_refuses_everything() -> None:
    with pytest.raises(Dropped) as exc:
        check_inner(ipv4_packet(), Prefixes(), MTU)
    assert reason(exc) is Drop.SOURCE_NOT_ALLOWED


def ref_check_inner(packet: bytes, allowed: list[ipaddress.IPv4Network], mtu: int) -> Drop | None:
    if len(packet) < 20:
        return Drop.INNER_MALFORMED
    if packet[0] >> 4 != 4:
        return Drop.INNER_NOT_IPV4
    ihl = (packet[0] & 15) * 4
    if not 20 <= ihl <= len(packet) or struct.unpack(">H", packet[2:4])[0] != len(packet):
        return Drop.INNER_MALFORMED
    if len(packet) > mtu:
        return Drop.INNER_TOO_BIG
    source = ipaddress.IPv4Address(packet[12:16])
    if not any(source in net for net in allowed):
        return Drop.SOURCE_NOT_ALLOWED
    return None


ALLOWED_NETS = [ipaddress.IPv4Network("10.1.0.0/16"), ipaddress.IPv4Network("192.168.65.0/24")]


@st.composite
def inner_packets(draw: st.DrawFn) -> bytes:
    """Mostly well-formed IPv4 packets with one or two fields disturbed."""
    ihl = draw(st.sampled_from([5, 5, 5, 6, 15, 4, 0]))
    payload = draw(st.binary(max_size=64))
    src = draw(st.sampled_from(["10.1.2.3", "192.168.65.9", "10.2.0.1", "8.8.8.8"]))
    packet = ipv4_packet(
        src=src,
        payload=payload,
        ihl=max(ihl, 5),
        version=draw(st.sampled_from([4, 4, 4, 6, 0, 15])),
    )
    if ihl < 5:
        packet = bytes([(packet[0] & 0xF0) | ihl]) + packet[1:]
    if draw(st.booleans()):
        packet = packet[: draw(st.integers(0, len(packet)))]
    if draw(st.integers(0, 4)) == 0:
        packet = packet[:2] + draw(st.binary(min_size=2, max_size=2)) + packet[4:]
    return packet


@FAST
@given(st.one_of(st.binary(max_size=80), inner_packets()), st.integers(20, 200))
def test_check_inner_matches_reference(packet: bytes, mtu: int) -> None:
    expected = ref_check_inner(packet, ALLOWED_NETS, mtu)
    try:
        check_inner(packet, ALLOWED, mtu)
    except Dropped as dropped:
        assert dropped.reason is expected
    else:
        assert expected is None


@FAST
@given(st.binary(max_size=60))
def test_ipv4_destination_never_raises(data: bytes) -> None:
    result = ipv4_destination(data)
    if len(data) >= 20 and data[0] >> 4 == 4:
        assert result == int(ipaddress.IPv4Address(data[16:20]))
    else:
        assert result is None


def test_ipv4_destination() -> None:
    assert ipv4_destination(ipv4_packet(dst="172.17.0.5")) == int(
        ipaddress.IPv4Address("172.17.0.5")
    )
    assert ipv4_destination(ipv4_packet(version=6)) is None
    assert ipv4_destination(b"\x45" * 19) is None


networks = st.builds(
    lambda address, length: ipaddress.IPv4Network((address, length), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(networks, max_size=8), st.data())
def test_prefixes_match_ipaddress(nets: list[ipaddress.IPv4Network], data: st.DataObject) -> None:
    prefixes = Prefixes(nets)
    assert bool(prefixes) == bool(nets)
    candidates = [st.integers(0, 2**32 - 1)]
    if nets:  # addresses inside (and at the edges of) the generated networks
        candidates.append(
            st.sampled_from(nets).flatmap(
                lambda n: st.integers(int(n.network_address), int(n.broadcast_address))
            )
        )
        candidates.append(
            st.sampled_from(nets).map(lambda n: (int(n.broadcast_address) + 1) % 2**32)
        )
    for _ in range(5):
        address = data.draw(st.one_of(candidates))
        ip = ipaddress.IPv4Address(address)
        holding = [n.prefixlen for n in nets if ip in n]
        assert (address in prefixes) == bool(holding)
        assert prefixes.longest_match(address) == max(holding, default=-1)


def test_prefixes_longest_match_examples() -> None:
    prefixes = Prefixes(["0.0.0.0/0", "172.16.0.0/12", "172.17.0.0/16", "172.17.0.5/32"])
    def addr(text: str) -> int:
        return int(ipaddress.IPv4Address(text))

    assert prefixes.longest_match(addr("172.17.0.5")) == 32
    assert prefixes.longest_match(addr("172.17.0.6")) == 16
    assert prefixes.longest_match(addr("172.18.0.1")) == 12
    assert prefixes.longest_match(addr("8.8.8.8")) == 0
    assert Prefixes(["10.0.0.0/8"]).longest_match(addr("11.0.0.0")) == -1
    assert addr("11.0.0.0") not in Prefixes(["10.0.0.0/8"])
    assert addr("10.255.255.255") in Prefixes(["10.0.0.0/8"])
    assert not Prefixes()


# --- control messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("hello", {"role": "host", "name": "docker-desktop", "version": "0.1.0"}),
        ("hello", {"role": "vm", "name": "n" * 64, "version": "v" * 32}),
        ("ack", {}),
        ("close_reason", {"reason": "shutting down"}),
        ("close_reason", {"reason": "r" * 200}),
    ],
)
def test_messages_round_trip(kind: str, body: dict[str, Any]) -> None:
    for seq in (1, 2, 2**53 - 1):
        payload = messages.encode(kind, seq, **body)
        expected = {"v": 1, "kind": kind, "seq": seq, **body}
        assert payload == json.dumps(expected, separators=(",", ":")).encode()
        assert messages.parse(payload) == messages.ControlMessage(kind, seq, body)


def test_messages_encode_refuses_oversize() -> None:
    with pytest.raises(ValueError, match="over 1200"):
        messages.encode("close_reason", 1, reason="x" * 1200)


HELLO = {"v": 1, "kind": "hello", "seq": 1, "role": "vm", "name": "vm1", "version": "1.0"}


def _with(**changes: Any) -> bytes:
    obj = {k: v for k, v in {**HELLO, **changes}.items() if v is not _DELETE}
    return json.dumps(obj).encode()


_DELETE = object()

INVALID_CONTROL: list[bytes] = [
    b"",
    b"{",
    b"\xff\xfe\x00",
    b"\x80{}",
    b"null",
    b"[]",
    b'"hello"',
    b"1",
    b"[" * 600 + b"]" * 600,
    b"{}",
    _with(v=_DELETE),
    _with(v=2),
    _with(v=0),
    _with(v="1"),
    _with(v=None),
    _with(kind=_DELETE),
    _with(kind="goodbye"),
    _with(kind="HELLO"),
    _with(kind=["hello"]),
    _with(kind=None),
    _with(seq=_DELETE),
    _with(seq=0),
    _with(seq=-1),
    _with(seq=2**53),
    _with(seq=2**64),
    _with(seq=1.0),
    _with(seq=True),
    _with(seq="1"),
    _with(seq=None),
    _with(role=_DELETE),
    _with(role="admin"),
    _with(role=["vm"]),
    _with(name=_DELETE),
    _with(name=""),
    _with(name="n" * 65),
    _with(name="vm\n1"),
    _with(name="\x00"),
    _with(name=5),
    _with(version=_DELETE),
    _with(version=""),
    _with(version="v" * 33),
    _with(version=1.0),
    json.dumps({"v": 1, "kind": "close_reason", "seq": 1}).encode(),
    json.dumps({"v": 1, "kind": "close_reason", "seq": 1, "reason": ""}).encode(),
    json.dumps({"v": 1, "kind": "close_reason", "seq": 1, "reason": "r" * 201}).encode(),
    json.dumps({"v": 1, "kind": "close_reason", "seq": 1, "reason": "a\tb"}).encode(),
    json.dumps({"v": 1, "kind": "close_reason", "seq": 1, "reason": {"x": 1}}).encode(),
    json.dumps({"v": 1, "kind": "ack", "seq": 1, "pad": "x" * 1200}).encode(),  # over 1200
    messages.encode("ack", 1) + b"x",
]


@pytest.mark.parametrize("payload", INVALID_CONTROL, ids=range(len(INVALID_CONTROL)))
def test_messages_schema_violations(payload: bytes) -> None:
    with pytest.raises(Dropped) as exc:
        messages.parse(payload)
    assert reason(exc) is Drop.CONTROL_INVALID


@pytest.mark.parametrize("version", [True, 1.0])
def test_messages_schema_version_must_be_the_integer_1(version: object) -> None:
    with pytest.raises(Dropped):
        messages.parse(_with(v=version))


def ref_valid_control(obj: Any) -> bool:
    """The schema, strictly: the version is the integer 1, not a value equal to it."""
    if not isinstance(obj, dict) or type(obj.get("v")) is not int or obj["v"] != 1:
        return False
    kind, seq = obj.get("kind"), obj.get("seq")
    if not isinstance(kind, str) or kind not in messages.KINDS:
        return False
    if type(seq) is not int or not 0 < seq < 2**53:
        return False

    def short(value: Any, limit: int) -> bool:
        return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()

    if kind == "hello":
        return (
            obj.get("role") in ("host", "vm")
            and short(obj.get("name"), 64)
            and short(obj.get("version"), 32)
        )
    if kind == "close_reason":
        return short(obj.get("reason"), 200)
    if kind == "routes":
        return ref_valid_routes(obj)
    if kind == "agent_status":
        return ref_valid_agent_status(obj)
    if kind == "switch_transport":
        return short(obj.get("to"), 32)
    if kind == "access_config":
        return ref_valid_access_config(obj)
    if kind == "links":
        pairs = obj.get("pairs")
        return isinstance(pairs, list) and len(pairs) <= 16 and all(
            isinstance(p, list) and len(p) == 2 and all(_is_ipv4_network(n) for n in p)
            for p in pairs)
    if kind == "hosts":
        return ref_valid_hosts(obj)
    return kind == "ack"


def _is_ipv4_address(text: Any) -> bool:
    if not isinstance(text, str) or len(text) > 15:
        return False
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def ref_valid_access_config(obj: dict[str, Any]) -> bool:
    addr, mtu, routes = obj.get("addr"), obj.get("mtu"), obj.get("routes")
    try:
        ipaddress.IPv4Interface(addr if isinstance(addr, str) and len(addr) <= 18 else "x")
    except ValueError:
        return False
    return (_is_ipv4_address(obj.get("peer")) and type(mtu) is int and 576 <= mtu <= 9000
            and isinstance(routes, list) and len(routes) <= 40
            and all(_is_ipv4_network(r) for r in routes))


def ref_valid_hosts(obj: dict[str, Any]) -> bool:
    gen, part, parts = obj.get("gen"), obj.get("part"), obj.get("parts")
    suffixes, entries = obj.get("suffixes"), obj.get("entries")
    if type(gen) is not int or type(part) is not int or type(parts) is not int:
        return False
    if not (0 < gen < 2**53 and 0 < parts <= 64 and 0 <= part < parts):
        return False

    def short(value: Any, limit: int) -> bool:
        return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()

    return (isinstance(suffixes, list) and len(suffixes) <= 8
            and all(short(x, 40) for x in suffixes)
            and isinstance(entries, list) and len(entries) <= 8
            and all(isinstance(e, list) and len(e) == 2 and short(e[0], 64)
                    and _is_ipv4_address(e[1]) for e in entries))


def _is_ipv4_network(text: Any) -> bool:
    if not isinstance(text, str) or len(text) > 18:
        return False
    try:
        ipaddress.IPv4Network(text)
    except ValueError:
        return False
    return True


def ref_valid_routes(obj: dict[str, Any]) -> bool:
    gen, part, parts, routes = (obj.get(k) for k in ("gen", "part", "parts", "routes"))
    if type(gen) is not int or type(part) is not int or type(parts) is not int:
        return False
    return (isinstance(routes, list) and 0 < gen < 2**53 and 0 < parts <= 64
            and 0 <= part < parts and len(routes) <= 40
            and all(_is_ipv4_network(r) for r in routes))


def ref_valid_agent_status(obj: dict[str, Any]) -> bool:
    fw, bridges = obj.get("firewall"), obj.get("bridges")
    if not isinstance(fw, dict) or not isinstance(bridges, dict) or len(bridges) > 64:
        return False
    backend, rules, error = fw.get("backend"), fw.get("rules"), fw.get("error")
    if backend is not None and not (isinstance(backend, str) and 0 < len(backend) <= 32
                                    and backend.isprintable()):
        return False
    if type(rules) is not int or not 0 <= rules <= 10_000:
        return False
    if not isinstance(error, str) or len(error) > 300 or not error.isprintable():
        return False
    if "dns" in obj and not ref_valid_dns(obj["dns"]):
        return False
    total = obj.get("bridges_total", len(bridges))
    if type(total) is not int or total < len(bridges) or total > 10_000:
        return False
    return all(_is_ipv4_network(k) and isinstance(v, str) and 0 < len(v) <= 15
               and v.isprintable() for k, v in bridges.items())


def ref_valid_dns(dns: Any) -> bool:
    counts = ("names", "redirects", "answered", "nxdomain", "refused", "malformed")
    if not isinstance(dns, dict) or sorted(dns) != sorted(
            ["listen", "error", "redirect_error", *counts]):
        return False
    listen = dns["listen"]
    if listen is not None and not (isinstance(listen, str) and 0 < len(listen) <= 21
                                   and listen.isprintable()):
        return False
    if not all(isinstance(dns[k], str) and len(dns[k]) <= 200 and dns[k].isprintable()
               for k in ("error", "redirect_error")):
        return False
    return all(type(dns[k]) is int and 0 <= dns[k] < 2**63 for k in counts)


ROUTES_OK = {"v": 1, "kind": "routes", "seq": 3, "gen": 2, "part": 0, "parts": 1,
             "routes": ["172.17.0.0/16", "10.1.0.0/24"]}
STATUS_OK = {"v": 1, "kind": "agent_status", "seq": 4,
             "firewall": {"backend": "iptables-nft", "rules": 6, "error": ""},
             "bridges": {"172.17.0.0/16": "docker0"}}
DNS_OK = {"listen": "192.168.251.1:53", "error": "", "names": 2, "redirects": 2,
          "redirect_error": "", "answered": 5, "nxdomain": 1, "refused": 0, "malformed": 3}


@pytest.mark.parametrize("good", [ROUTES_OK, STATUS_OK,
                                  {**STATUS_OK, "firewall": {"backend": None, "rules": 0,
                                                             "error": "no iptables"}},
                                  {**STATUS_OK, "dns": DNS_OK},
                                  {**STATUS_OK, "bridges_total": 70},
                                  {**STATUS_OK, "dns": {**DNS_OK, "listen": None,
                                                        "error": "cannot listen"}}])
def test_routes_and_agent_status_messages(good: dict[str, Any]) -> None:
    message = messages.parse(json.dumps(good).encode())
    assert message.kind == good["kind"]
    assert ref_valid_control(good)


@pytest.mark.parametrize("bad", [
    {**ROUTES_OK, "part": 1},  # part must be below parts
    {**ROUTES_OK, "routes": ["172.17.0.1/16"]},  # host bits set
    {**ROUTES_OK, "routes": ["fd00::/64"]},  # IPv6 is not routed yet
    {**ROUTES_OK, "routes": ["10.0.0.0/8"] * 41},  # over one part
    {**ROUTES_OK, "gen": True},
    {**STATUS_OK, "firewall": {"backend": "x", "rules": -1, "error": ""}},
    {**STATUS_OK, "firewall": {"backend": "x", "rules": 1, "error": "a\nb"}},
    {**STATUS_OK, "bridges": {"not-a-net": "br0"}},
    {**STATUS_OK, "bridges": {"10.0.0.0/8": "a-bridge-name-too-long"}},
    {**STATUS_OK, "bridges": []},
    {**STATUS_OK, "dns": {**DNS_OK, "answered": -1}},
    {**STATUS_OK, "dns": {**DNS_OK, "names": True}},
    {**STATUS_OK, "dns": {**DNS_OK, "error": "x" * 201}},
    {**STATUS_OK, "dns": {**DNS_OK, "listen": ""}},
    {**STATUS_OK, "dns": {**DNS_OK, "extra": 1}},
    {**STATUS_OK, "dns": []},
    {**STATUS_OK, "bridges_total": 0},  # fewer than it lists
    {**STATUS_OK, "bridges_total": "1"},
])
def test_bad_routes_and_agent_status_are_refused(bad: dict[str, Any]) -> None:
    assert not ref_valid_control(bad)
    with pytest.raises(Dropped) as exc:
        messages.parse(json.dumps(bad).encode())
    assert reason(exc) is Drop.CONTROL_INVALID


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=80),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
control_objects = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), json_values),
        "kind": st.one_of(st.sampled_from(messages.KINDS), json_values),
        "seq": st.one_of(st.integers(-2, 2**53 + 2), json_values),
        "role": st.one_of(st.sampled_from(["host", "vm"]), json_values),
        "name": st.one_of(st.text(max_size=70), json_values),
        "version": st.one_of(st.text(max_size=40), json_values),
        "reason": st.one_of(st.text(max_size=210), json_values),
        "extra": json_values,
    },
)


@settings(max_examples=120, deadline=None)
@given(st.one_of(control_objects, json_values))
def test_messages_parse_matches_schema(obj: Any) -> None:
    payload = json.dumps(obj).encode()
    expected = ref_valid_control(obj) and len(payload) <= messages.MAX_CONTROL
    try:
        message = messages.parse(payload)
    except Dropped as dropped:
        assert dropped.reason is Drop.CONTROL_INVALID
        assert not expected
        return
    assert expected
    assert (message.kind, message.seq) == (obj["kind"], obj["seq"])
    assert message.body == {k: v for k, v in obj.items() if k not in ("v", "kind", "seq")}


@FAST
@given(st.binary(max_size=1300))
def test_messages_parse_arbitrary_bytes(data: bytes) -> None:
    try:
        message = messages.parse(data)
    except Dropped as dropped:
        assert dropped.reason is Drop.CONTROL_INVALID
        return
    assert message.kind in messages.KINDS


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(list(b'{}[]",:0123456789.-+eEtrufalsn\\ \x00\xff')), max_size=200)
)
def test_messages_parse_json_like_bytes(chars: list[int]) -> None:
    try:
        messages.parse(bytes(chars))
    except Dropped as dropped:
        assert dropped.reason is Drop.CONTROL_INVALID
