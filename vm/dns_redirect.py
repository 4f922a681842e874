"""Send containers' DNS queries for the hosts suffixes to the agent's responder.

As docker-connector does: one nat PREROUTING rule per suffix, matching UDP port 53 and the
suffix's labels in the packet (xt_string), DNAT to the responder on the agent's tunnel
address. Containers on the default bridge ask their resolver directly; containers on
user-defined networks ask Docker's embedded DNS, which forwards from inside the container's
namespace, through the bridge: PREROUTING in the VM sees both.

    -t nat -I PREROUTING 1 -p udp --dport 53 -m string --algo bm --icase
           --hex-string '|03646576056c6f63616c00|' -m comment --comment ctun:TUN
           -j DNAT --to-destination VMADDR:53

The pattern ends with the root label (00), so only names that *end* in the suffix are
redirected: `x.dev.local.example.com` still goes to its own resolver. Rules carry the
firewall's `ctun:TUN` tag, so a crashed run's are found and removed; `ensure()` puts back
what Docker (or a user) flushed.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
from collections.abc import Sequence
from ipaddress import IPv4Address
from itertools import pairwise

from .dns_packet import encode_name
from .firewall import (
    LOCK_WAIT,
    PREROUTING,
    TAG_PREFIX,
    FirewallError,
    Runner,
    parse_listing,
    run_command,
    run_iptables,
)

log = logging.getLogger("ctun.vm.dns")

NAT = "nat"


def rule_spec(suffix: str, tag: str, target: IPv4Address, port: int) -> tuple[str, ...]:
    """The match and target of the redirect for one suffix (shared by -C, -I and -D)."""
    pattern = encode_name(suffix).hex()
    return ("-p", "udp", "-m", "udp", "--dport", "53",
            "-m", "string", "--algo", "bm", "--icase", "--hex-string", f"|{pattern}|",
            "-m", "comment", "--comment", tag,
            "-j", "DNAT", "--to-destination", f"{target}:{port}")  # fmt: skip


def _ours(tokens: Sequence[str], tag: str) -> bool:
    """A redirect of ours in an `iptables -S` line: our tag, a DNAT, a string match."""
    pairs = set(pairwise(tokens))
    return ("--comment", tag) in pairs and ("-j", "DNAT") in pairs and "--hex-string" in tokens


class DnsRedirect:
    """The nat rules for a set of suffixes. Thread-safe."""

    def __init__(self, tun: str, target: IPv4Address, port: int = 53,
                 binary: str = "iptables", runner: Runner | None = None) -> None:
        self.tag = f"{TAG_PREFIX}{tun}"
        self._target = target
        self._port = port
        self._binary = binary
        self._runner: Runner = runner or run_command
        self._lock = threading.Lock()
        self._desired: list[tuple[str, ...]] = []

    def cleanup_leftovers(self) -> list[str]:
        """Remove every redirect with our tag (a crashed run's); describe each."""
        removed = []
        with self._lock:
            listing = parse_listing(NAT, self._run(["-t", NAT, "-S", PREROUTING]).stdout)
            for entry in listing.rules(PREROUTING):
                if _ours(entry.tokens, self.tag):
                    self._run(["-t", NAT, "-D", PREROUTING, *entry.tokens])
                    removed.append(f"-t {NAT} {entry.line}")
        return removed

    def apply(self, suffixes: Sequence[str]) -> None:
        """One rule per suffix: add the missing, remove those of suffixes no longer given."""
        wanted = [rule_spec(s, self.tag, self._target, self._port) for s in suffixes]
        with self._lock:
            for spec in self._desired:
                if spec not in wanted and self._present(spec):
                    self._run(["-t", NAT, "-D", PREROUTING, *spec])
            self._desired = wanted
            self._add_missing()

    def ensure(self) -> bool:
        """Put back rules that went (Docker restarted, a user flushed nat); True if any."""
        with self._lock:
            return self._add_missing()

    def close(self) -> None:
        """Remove our rules; tries each even if one fails, then reports the first failure."""
        with self._lock:
            first_error: FirewallError | None = None
            for spec in self._desired:
                try:
                    if self._present(spec):
                        self._run(["-t", NAT, "-D", PREROUTING, *spec])
                except FirewallError as exc:
                    first_error = first_error or exc
            self._desired = []
            if first_error is not None:
                raise first_error

    def rules(self) -> int:
        """How many redirects ctun wants in place."""
        return len(self._desired)

    def _add_missing(self) -> bool:
        added = False
        for spec in self._desired:
            if not self._present(spec):
                self._run(["-t", NAT, "-I", PREROUTING, "1", *spec])
                log.info("DNS redirect added: -t nat -A PREROUTING %s", shlex.join(spec))
                added = True
        return added

    def _present(self, spec: tuple[str, ...]) -> bool:
        return self._run(["-t", NAT, "-C", PREROUTING, *spec], absent_ok=True).returncode == 0

    def _run(self, args: list[str], absent_ok: bool = False) -> subprocess.CompletedProcess[str]:
        return run_iptables(
            self._runner, [self._binary, "-w", LOCK_WAIT, *args], absent_ok=absent_ok,
            not_found="install iptables in the agent's image to redirect containers' DNS "
                      "queries",
            compare="compare with `iptables-save -t nat`", hint=_string_hint)


def _string_hint(stderr: str) -> str | None:
    if "string" in stderr.lower():
        return "the kernel needs the xt_string match (CONFIG_NETFILTER_XT_MATCH_STRING)"
    return None
