"""The agent's DNS responder for the host's hosts-file entries (docker-connector's `hosts`).

The host pushes a full snapshot in `hosts` messages (suffixes and (name, address) entries);
the agent answers A queries for those names on its tunnel address, port 53, and redirects
containers' queries for the suffixes there (vm.dns_redirect). Names under a suffix that the
snapshot lacks get NXDOMAIN, so a removed entry stops resolving at once; anything else gets
REFUSED: this is no open resolver.

Threads: messages arrive on the network thread and are only reassembled there (HostsFeed);
a keeper thread (vm.keeper) applies the newest snapshot and re-checks the redirect every few
seconds; the responder has a thread of its own, which never touches iptables.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from ..core.hosts_file import normalise_suffix, under, valid_name
from ..core.messages import ControlMessage, Snapshots
from .agent_context import AgentContext
from .dns_packet import (
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    TYPE_A,
    Malformed,
    Question,
    parse_query,
    reply,
)
from .dns_redirect import DnsRedirect
from .firewall import FirewallError, Runner
from .keeper import Keeper

log = logging.getLogger("ctun.vm.dns")

DNS_PORT = 53
RECHECK_EVERY = 2.0  # seconds between checks that the redirect is still in place
RECV_BUFFER = 4096  # larger than any query we accept, so an oversize one is seen as such
REPORT_TEXT = 200  # characters of an error the host is told


@dataclass(frozen=True)
class Names:
    """What the responder knows: replaced whole, never changed (the serving thread reads it
    without a lock)."""

    suffixes: tuple[str, ...] = ()
    addresses: Mapping[str, IPv4Address] = field(default_factory=dict)

    def answer(self, question: Question) -> tuple[bytes, str]:
        """The reply, and the counter it goes to."""
        address = self.addresses.get(question.name)
        if address is not None:
            if question.qtype == TYPE_A:
                return reply(question, RCODE_NOERROR, address), "answered"
            return reply(question, RCODE_NOERROR), "no_data"  # AAAA etc.: the name exists
        if any(under(question.name, s) for s in self.suffixes):
            return reply(question, RCODE_NXDOMAIN), "nxdomain"
        return reply(question, RCODE_REFUSED), "refused"


def make_names(suffixes: Iterable[str], entries: Iterable[Sequence[str]]) -> tuple[Names, int]:
    """Names from a snapshot the network delivered, and how many of its items were invalid
    (skipped, never trusted: the schema check says only "short printable strings")."""
    bad = 0
    good_suffixes: list[str] = []
    for raw in suffixes:
        suffix = normalise_suffix(raw)
        if valid_name(suffix):
            good_suffixes.append(suffix)
        else:
            bad += 1
    addresses: dict[str, IPv4Address] = {}
    for name, address in entries:
        lowered = name.rstrip(".").lower()
        try:
            parsed = IPv4Address(address)
        except ValueError:
            parsed = None
        if parsed is None or not valid_name(lowered):
            bad += 1
            continue
        addresses.setdefault(lowered, parsed)
    return Names(tuple(good_suffixes), addresses), bad


class _Listener:
    """A UDP socket and the thread that answers on it."""

    def __init__(self, address: tuple[str, int], service: DnsService) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(address)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._service = service
        self._thread = threading.Thread(target=self._serve, name="ctun-dns", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return str(host), int(port)

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for each in (self.sock, self._wake_r, self._wake_w):
            each.close()

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                data, peer = self.sock.recvfrom(RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # e.g. an ICMP error for an earlier reply: keep serving
                self._service.count("receive_errors")
                log.debug("dns receive: %s", exc)
                continue
            try:
                answer = self._service.handle(data)
            except Exception:  # a bug must cost one query, never the responder
                self._service.count("errors")
                log.exception("dns: answering a query failed")
                continue
            if answer is None:
                continue
            try:
                self.sock.sendto(answer, peer)
            except OSError:
                self._service.count("send_errors")


class DnsService:
    """The responder on `listen_address`:`port` and the redirect to it.

    Idle (no socket, no rules) until a snapshot with suffixes or names arrives; `apply()`
    with nothing stops both again. `iptables=None`: no redirect (no iptables, or tests).
    """

    def __init__(self, listen_address: IPv4Address, tun_name: str, *, port: int = DNS_PORT,
                 iptables: str | None = "iptables", runner: Runner | None = None) -> None:
        self.listen_address = listen_address
        self._port = port
        self._names = Names()
        self._lock = threading.Lock()
        self._listener: _Listener | None = None
        self._redirect = (DnsRedirect(tun_name, listen_address, port, iptables, runner)
                          if iptables else None)
        self._counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()  # status() copies while the responder counts
        self.error = ""  # why the responder does not listen
        self.redirect_error = ""
        # Closed for good: a keeper round that outlived its stop() must not listen or add
        # redirects again after close() removed them.
        self._closed = False

    # -- the responder's side (its own thread)

    def handle(self, data: bytes) -> bytes | None:
        """The reply to one datagram, or None (malformed: counted, never answered)."""
        try:
            question = parse_query(data)
        except Malformed as exc:
            self.count(f"dropped_{exc}")
            return None
        answer, outcome = self._names.answer(question)
        self.count(outcome)
        return answer

    def count(self, what: str, n: int = 1) -> None:
        with self._counters_lock:
            self._counters[what] += n

    # -- control (the keeper thread, or a test)

    def cleanup_leftovers(self) -> list[str]:
        """Remove a crashed run's redirects; call before the first apply()."""
        if self._redirect is None:
            return []
        return self._redirect.cleanup_leftovers()

    def apply(self, suffixes: Iterable[str], entries: Iterable[Sequence[str]]) -> None:
        """Serve exactly this snapshot from now on."""
        names, bad = make_names(suffixes, entries)
        if bad:
            self.count("invalid_entries", bad)
            log.warning("ignored %d invalid names or suffixes from the host", bad)
        with self._lock:
            if self._closed:
                return
            self._names = names
            active = bool(names.suffixes or names.addresses)
            if active:
                self._listen()
            elif self._listener is not None:
                self._listener.close()
                self._listener = None
            self._redirect_to(names.suffixes if self._listener is not None else ())
        log.info("DNS: serving %d names under %s", len(names.addresses),
                 ", ".join(names.suffixes) or "no suffix")

    def ensure(self) -> None:
        """Retry what failed (the socket, the rules) and put back flushed rules."""
        with self._lock:
            if self._closed:
                return
            if (self._names.suffixes or self._names.addresses) and self._listener is None:
                self._listen()
                self._redirect_to(self._names.suffixes if self._listener is not None else ())
            elif self._redirect is not None:
                try:
                    if self._redirect.ensure():
                        log.warning("DNS redirect rules were gone (Docker restarted?); re-added")
                    self.redirect_error = ""
                except FirewallError as exc:
                    self._redirect_failed(exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            if self._redirect is not None:
                try:
                    self._redirect.close()
                except FirewallError as exc:
                    log.error("could not remove every DNS redirect rule: %s", exc)

    def report(self) -> dict[str, Any]:
        """Our part of the agent's status for the host (`ctun status` there), bounded to
        fit one control message; nothing while the host asks for no names."""
        names = self._names
        if not (names.suffixes or names.addresses):
            return {}
        listener = self._listener
        with self._counters_lock:
            counters = dict(self._counters)
        redirect_error = self.redirect_error if self._redirect is not None else \
            "not managed: no iptables in the agent"
        return {"dns": {
            "listen": f"{listener.address[0]}:{listener.address[1]}" if listener else None,
            "error": self.error[:REPORT_TEXT],
            "names": len(names.addresses),
            "redirects": self._redirect.rules() if self._redirect is not None else 0,
            "redirect_error": redirect_error[:REPORT_TEXT],
            "answered": counters.get("answered", 0) + counters.get("no_data", 0),
            "nxdomain": counters.get("nxdomain", 0),
            "refused": counters.get("refused", 0),
            "malformed": sum(n for k, n in counters.items() if k.startswith("dropped_")),
        }}

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the responder listens now (the real port when 0 was asked for)."""
        listener = self._listener
        return listener.address if listener is not None else None

    def status(self) -> dict[str, Any]:
        names = self._names
        listener = self._listener
        with self._counters_lock:
            counters = dict(sorted(self._counters.items()))
        return {
            "listen": f"{listener.address[0]}:{listener.address[1]}" if listener else None,
            "error": self.error,
            "suffixes": list(names.suffixes),
            "names": len(names.addresses),
            "counters": counters,
            "redirect": {
                "managed": self._redirect is not None,
                "rules": self._redirect.rules() if self._redirect is not None else 0,
                "error": self.redirect_error,
            },
        }

    def _listen(self) -> None:
        if self._listener is not None:
            return
        try:
            self._listener = _Listener((str(self.listen_address), self._port), self)
            self.error = ""
            log.info("DNS responder listening on %s:%d", self.listen_address, self._port)
        except OSError as exc:
            message = (f"cannot listen on {self.listen_address}:{self._port}: "
                       f"{exc.strerror or exc}")
            if message != self.error:
                log.error("DNS: %s; retrying every %.0f s", message, RECHECK_EVERY)
            self.error = message

    def _redirect_to(self, suffixes: Sequence[str]) -> None:
        if self._redirect is None:
            return
        try:
            self._redirect.apply(suffixes)
            self.redirect_error = ""
        except FirewallError as exc:
            self._redirect_failed(exc)

    def _redirect_failed(self, exc: FirewallError) -> None:
        if str(exc) != self.redirect_error:
            log.error("DNS redirect: %s", exc)
        self.redirect_error = str(exc)


Snapshot = tuple[list[str], list[list[str]]]  # (suffixes, [name, address] entries)


class HostsFeed:
    """Reassembles `hosts` snapshots from their parts (network thread) and hands each
    complete one to `deliver` (the keeper's offer)."""

    def __init__(self, deliver: Callable[[Snapshot], None]) -> None:
        self._deliver = deliver
        self._snapshots = Snapshots()

    def on_control(self, _peer: str, message: ControlMessage) -> None:
        if message.kind != "hosts":
            return
        bodies = self._snapshots.take(message)
        if bodies is not None:
            self._deliver((list(bodies[0]["suffixes"]),
                           [entry for body in bodies for entry in body["entries"]]))


def setup(ctx: AgentContext) -> None:
    """The agent feature: the responder on the tunnel address, fed by the host's `hosts`."""
    # The redirect must go where Docker's own rules are (iptables-nft or -legacy).
    binary = ctx.firewall.backend if ctx.firewall is not None else None
    service = DnsService(ctx.cfg.tunnel.vm_address, ctx.cfg.tunnel.interface, iptables=binary)
    try:
        for line in service.cleanup_leftovers():
            log.warning("cleaned up after a previous run: DNS redirect %s", line)
    except FirewallError as exc:
        service.redirect_error = str(exc)
        log.error("DNS redirect: %s", exc)
    keeper: Keeper[Snapshot] = Keeper(
        "ctun-dns-keeper", apply=lambda snapshot: service.apply(*snapshot),
        refresh=service.ensure, every=RECHECK_EVERY, log=log, what="DNS keeper")
    ctx.on_control.append(HostsFeed(keeper.offer).on_control)
    ctx.status_parts.append(lambda: {"dns": service.status()})
    ctx.report_parts.append(service.report)
    keeper.start()
    ctx.resources.callback(service.close)  # after the keeper has stopped (callbacks: LIFO)
    ctx.resources.callback(keeper.stop)
