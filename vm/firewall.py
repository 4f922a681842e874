"""Open Docker's firewall for the tunnel, and keep it open.

Docker sets the FORWARD policy to DROP and lets through only what its own rules allow; Engine 28
adds "direct access filtering" in the raw table (`-d CONTAINER ! -i BRIDGE -j DROP`), Docker
Desktop adds DROPs of its own, and users may end DOCKER-USER with a DROP. So the agent's
forwarded traffic needs ACCEPT rules of its own, *above* all of those, for each routed subnet:

    filter DOCKER-USER (or FORWARD):  -i TUN -o BRIDGE -d SUBNET -j ACCEPT
                                      -i BRIDGE -o TUN -s SUBNET --ctstate RELATED,ESTABLISHED
                                      -j ACCEPT   (replies only: containers never open
                                                   connections into the tunnel)
    raw PREROUTING:                   -i TUN -d SUBNET -j ACCEPT

Given the host's tunnel address, containers may also open connections to it (the host's
proxy listeners and services live there): `-i BRIDGE -o TUN -s SUBNET -d HOST/32 -j ACCEPT`.

Subnet links (`iptables A+B`) let two bridges talk, both ways, past Docker's isolation chains:

    filter DOCKER-USER (or FORWARD):  -i BRA -o BRB -s A -d B -j ACCEPT   and the reverse
    raw PREROUTING:                   -i BRA -s A -d B -j ACCEPT          and the reverse

Every rule carries the comment `ctun:TUN`, so this module finds exactly its own rules again,
including those of a run that crashed. Rules are always inserted at position 1, never appended,
and `ensure()` moves them back up when Docker (restarting, starting a container) or a user puts
a DROP above them.

Every command goes through one `Runner`, so tests can record the exact argv and run it inside a
network namespace.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_network

log = logging.getLogger("ctun.vm.firewall")

Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]

TAG_PREFIX = "ctun:"
# Seconds to wait for the xtables lock: Docker and other tools hold it while they rewrite
# rules, and failing straight away would turn their routine work into our errors.
LOCK_WAIT = "5"
# A hard limit on one command, well above LOCK_WAIT: a hung iptables must not hang the agent.
COMMAND_TIMEOUT = 30.0

FILTER = "filter"
RAW = "raw"
DOCKER_USER = "DOCKER-USER"
FORWARD = "FORWARD"
PREROUTING = "PREROUTING"
# The chains a leftover of ours can be in (whichever filter chain that run chose).
OUR_CHAINS: dict[str, tuple[str, ...]] = {FILTER: (DOCKER_USER, FORWARD), RAW: (PREROUTING,)}

# Backend detection: Docker programs one of these; the plain `iptables` may be the other one,
# and rules added to the wrong backend are evaluated too but ordered separately, so a DROP in
# Docker's backend would still win.
VARIANTS = ("iptables-legacy", "iptables-nft")
DOCKER_CHAINS = frozenset({"DOCKER", DOCKER_USER})
DEFAULT_BINARY = "iptables"

DROPPING_TARGETS = frozenset({"DROP", "REJECT"})


def legacy_tables_loaded() -> bool:
    """True when the kernel holds legacy (x_tables) iptables tables in this namespace."""
    try:
        with open("/proc/net/ip_tables_names", encoding="ascii") as names:
            return bool(names.read().split())
    except OSError:
        return False


class FirewallError(Exception):
    """One-line message naming the command and what to do."""


def run_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The default runner: run argv here, capturing text output; never raises on exit codes."""
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT
    )


@dataclass(frozen=True)
class Rule:
    """One rule of ours: table, chain and the match/target spec shared by -C, -I and -D."""

    table: str
    chain: str
    spec: tuple[str, ...]

    def line(self) -> str:
        return f"-t {self.table} -A {self.chain} {shlex.join(self.spec)}"


@dataclass(frozen=True)
class BridgeLink:
    """A linked pair as the agent resolved it: the bridge serving each side and the subnet
    to match there (None: the whole bridge, when its subnet is not known)."""

    bridge_a: str
    subnet_a: IPv4Network | None
    bridge_b: str
    subnet_b: IPv4Network | None

    def sort_key(self) -> tuple[str, str, str, str]:
        return (self.bridge_a, str(self.subnet_a), self.bridge_b, str(self.subnet_b))


@dataclass(frozen=True)
class Listed:
    """One `-A` line of `iptables -S`: its text and its tokens after `-A CHAIN`."""

    line: str
    tokens: tuple[str, ...]


@dataclass
class Listing:
    """A table as `iptables -t TABLE -S` shows it: chains in order, each with its rules."""

    table: str
    chains: dict[str, list[Listed]] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)

    def rules(self, chain: str) -> list[Listed]:
        return self.chains.get(chain, [])

    def dropping_chains(self) -> set[str]:
        """Chains that drop or reject, directly or through a chain they jump or go to
        (e.g. Docker's DOCKER-ISOLATION-STAGE-1 -> STAGE-2 -> DROP)."""
        memo: dict[str, bool] = {}

        def drops(chain: str) -> bool:
            if chain not in memo:
                memo[chain] = False  # iptables rejects loops; this only guards the recursion
                memo[chain] = any(
                    target in DROPPING_TARGETS or (target in self.chains and drops(target))
                    for target in (_target(r.tokens) for r in self.rules(chain))
                )
            return memo[chain]

        return {chain for chain in self.chains if drops(chain)}


def parse_listing(table: str, text: str) -> Listing:
    listing = Listing(table)
    for raw_line in text.splitlines():
        line = raw_line.strip()
        try:
            tokens = shlex.split(line)
        except ValueError:
            log.debug("cannot parse iptables line %r; ignoring it", line)
            continue
        if len(tokens) >= 2 and tokens[0] in ("-P", "-N"):
            listing.chains.setdefault(tokens[1], [])
            if tokens[0] == "-P" and len(tokens) >= 3:
                listing.policies[tokens[1]] = tokens[2]
        elif len(tokens) >= 2 and tokens[0] == "-A":
            listing.chains.setdefault(tokens[1], []).append(Listed(line, tuple(tokens[2:])))
    return listing


def _target(tokens: Sequence[str]) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


def _comment(tokens: Sequence[str]) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token == "--comment":
            return tokens[i + 1]
    return None


def rule_key(tokens: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """A comparable form of a rule spec: iptables prints options in its own order and
    normalises addresses (`10.0.0.5` -> `10.0.0.5/32`), so compare (option, value) pairs."""
    pairs: list[tuple[str, str]] = []
    negate = False
    i = 0
    while i < len(tokens):
        option = tokens[i]
        i += 1
        if option == "!":
            negate = True
            continue
        values: list[str] = []
        while i < len(tokens) and tokens[i] != "!" and not tokens[i].startswith("-"):
            values.append(tokens[i])
            i += 1
        value = " ".join(values)
        if option in ("-s", "-d", "--source", "--destination"):
            with contextlib.suppress(ValueError):  # not an address: compare it as it is
                value = str(ip_network(value, strict=False))
        elif option == "--ctstate":
            value = ",".join(sorted(value.split(",")))
        # `-m MODULE` is implied by the module's own options, and iptables may add or drop it.
        if option not in ("-m", "--match"):
            pairs.append(("!" + option if negate else option, value))
        negate = False
    return tuple(sorted(pairs))


def _address(option: str, network: IPv4Network | None) -> tuple[str, ...]:
    return () if network is None else (option, str(network))


def _check_name(kind: str, name: str) -> None:
    # Interface names go onto command lines and into the tag; refuse anything iptables would not
    # accept as an interface rather than produce a rule that matches something else.
    if not name or len(name) > 15 or any(c.isspace() or c in "/!\"'" for c in name):
        raise ValueError(f"invalid {kind} interface name {name!r}")


class Firewall:
    """The iptables rules that let the tunnel reach the Docker bridges.

    Thread-safe: the agent calls ensure() from its timer while apply() follows network changes.
    """

    def __init__(
        self,
        tun: str,
        runner: Runner | None = None,
        binary: str | None = None,
        legacy_loaded: Callable[[], bool] | None = None,
        host_address: IPv4Address | None = None,
    ) -> None:
        _check_name("tun", tun)
        self.tun = tun
        # The host's tunnel address: containers may open connections to it (None: replies only).
        self.host_address = host_address
        self.tag = f"{TAG_PREFIX}{tun}"
        self._runner: Runner = runner or run_command
        self._binary = binary
        self._legacy_loaded = legacy_loaded or legacy_tables_loaded
        self._lock = threading.RLock()
        self._links: dict[IPv4Network, str] = {}
        self._bridge_links: tuple[BridgeLink, ...] = ()
        # False from the start of a sync until it finished: a failed one is done again.
        self._in_sync = True
        # What ensure() maintains.
        self._desired: list[Rule] = []
        # Rules that may be in the tables because of us (added, or found already there with our
        # tag): what close() removes. A superset of _desired while apply() is under way, so a
        # failure half-way through still leaves close() able to clean up.
        self._owned: list[Rule] = []

    # -- backend ---------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The iptables binary in use; detected on first use when not given."""
        with self._lock:
            if self._binary is None:
                self._binary = self._detect()
            return self._binary

    def _detect(self) -> str:
        showing = []
        for variant in VARIANTS:
            # Merely listing with iptables-legacy loads empty legacy tables into the kernel:
            # ask it only when such tables exist already (someone, Docker perhaps, uses them).
            if variant == "iptables-legacy" and not self._legacy_loaded():
                continue
            try:
                result = self._runner([variant, "-w", LOCK_WAIT, "-t", FILTER, "-S"])
            except (OSError, subprocess.SubprocessError):
                continue  # not installed (or unusable): it is not the one Docker programs
            chains = parse_listing(FILTER, result.stdout).chains.keys()
            if result.returncode == 0 and DOCKER_CHAINS & chains:
                showing.append(variant)
        chosen = showing[0] if len(showing) == 1 else DEFAULT_BINARY
        log.info("iptables backend: %s (Docker chains seen in: %s)", chosen,
                 ", ".join(showing) or "none")
        return chosen

    # -- public API ------------------------------------------------------------------------

    def cleanup_leftovers(self) -> list[str]:
        """Remove every rule tagged with our tag, left by a run that crashed; describe each.

        Call it before apply(): it does not know which tagged rules are the current ones.
        """
        removed: list[str] = []
        with self._lock:
            for table, chains in OUR_CHAINS.items():
                listing = self._list(table)
                for chain in chains:
                    for entry in listing.rules(chain):
                        if _comment(entry.tokens) == self.tag:
                            self._run(["-t", table, "-D", chain, *entry.tokens])
                            removed.append(f"removed leftover rule: -t {table} {entry.line}")
        for description in removed:
            log.info("%s", description)
        return removed

    def apply(self, links: Mapping[IPv4Network, str]) -> None:
        """Make the rules match `links` (routed subnet -> bridge interface): add what is
        missing, remove our rules for subnets (or bridges) no longer listed."""
        new_links = dict(links)
        for subnet, bridge in new_links.items():
            if not isinstance(subnet, IPv4Network):
                raise TypeError(f"subnet {subnet!r} is not an IPv4Network")
            _check_name("bridge", bridge)
        with self._lock:
            self._links = new_links
            self._sync()

    def link_bridges(self, links: Iterable[BridgeLink]) -> bool:
        """Make the subnet-link rules match `links` (the full set); the routed subnets' rules
        stay. True if it synced the tables, False if nothing had changed."""
        new_links = tuple(sorted(set(links), key=BridgeLink.sort_key))
        for link in new_links:
            _check_name("bridge", link.bridge_a)
            _check_name("bridge", link.bridge_b)
        with self._lock:
            if new_links == self._bridge_links and self._in_sync:
                return False
            self._bridge_links = new_links
            self._sync()
            return True

    def routed(self) -> dict[IPv4Network, str]:
        """The routed subnets and their bridges, as the last apply() gave them."""
        with self._lock:
            return dict(self._links)

    def _sync(self) -> None:
        self._in_sync = False
        listings = {FILTER: self._list(FILTER), RAW: self._list(RAW)}
        chain = self._filter_chain(listings[FILTER])
        wanted = [r for r in self._rules_for(chain) if self._guarded(listings[r.table], r.chain)]
        self._desired = wanted
        self._own(wanted)
        for rule in wanted:
            if not self._check(rule):
                self._insert(rule)
        self._remove_unwanted()
        self._in_sync = True

    def ensure(self) -> bool:
        """Re-check that every desired rule exists and sits above any DROP/REJECT (or jump to a
        chain that drops) in its chain; re-insert at the top what is missing or shadowed.
        True if anything changed."""
        with self._lock:
            if not self._desired:
                return False
            changed = False
            filter_listing = self._list(FILTER)
            chain = self._filter_chain(filter_listing)
            if any(r.table == FILTER and r.chain != chain for r in self._desired):
                # Docker created DOCKER-USER after apply() (or it went away): move our filter
                # rules there, or they would sit behind Docker's own FORWARD rules.
                log.info("moving the firewall rules to filter %s", chain)
                self._desired = self._rules_for(chain)
                self._own(self._desired)
                changed = self._remove_unwanted()
                filter_listing = self._list(FILTER)
            listings = {FILTER: filter_listing, RAW: self._list(RAW)}
            dropping = {table: each.dropping_chains() for table, each in listings.items()}
            reinsert: list[Rule] = []
            for rule in self._desired:
                state = self._state(rule, listings[rule.table], dropping[rule.table])
                if state == "shadowed":
                    log.warning("a DROP rule now precedes %s; moving it back to the top",
                                rule.line())
                    # Delete before re-inserting: -D removes the first match, which after an
                    # insert at the top would be the new copy rather than the shadowed one.
                    self._delete(rule)
                    reinsert.append(rule)
                elif state == "missing":
                    # Confirm with -C: should the listing show our rule in a form rule_key does
                    # not recognise, re-adding it would duplicate it.
                    if self._check(rule):
                        log.debug("%s present but not recognised in the listing", rule.line())
                        continue
                    log.warning("firewall rule missing (Docker restarted?); adding %s",
                                rule.line())
                    reinsert.append(rule)
            # Each goes to position 1, so insert in reverse to keep the desired order on top.
            for rule in reversed(reinsert):
                self._insert(rule)
            return changed or bool(reinsert)

    def close(self) -> None:
        """Remove exactly the rules this object added (or adopted). Idempotent; tries every
        rule even if one fails, then reports the first failure."""
        with self._lock:
            first_error: FirewallError | None = None
            for rule in reversed(self._owned):
                try:
                    if self._check(rule):
                        self._delete(rule)
                except FirewallError as exc:
                    first_error = first_error or exc
            self._owned = []
            self._desired = []
            self._links = {}
            self._bridge_links = ()
            if first_error is not None:
                raise first_error

    def rules(self) -> list[str]:
        """Our rules as they are in the tables now, as `-t TABLE -A CHAIN ...` lines (the
        iptables-save line, prefixed with its table)."""
        with self._lock:
            found = []
            for table in OUR_CHAINS:
                listing = self._list(table)
                for entries in listing.chains.values():
                    found += [f"-t {table} {e.line}" for e in entries
                              if _comment(e.tokens) == self.tag]
            return found

    # -- helpers ---------------------------------------------------------------------------

    def _rules_for(self, chain: str) -> list[Rule]:
        """Every rule the current state asks for, in order, each once."""
        tag = ("-m", "comment", "--comment", self.tag)
        rules = []
        for subnet, bridge in sorted(self._links.items()):
            net = str(subnet)
            rules += [
                Rule(FILTER, chain, ("-i", self.tun, "-o", bridge, "-d", net, *tag,
                                     "-j", "ACCEPT")),
                Rule(FILTER, chain, ("-i", bridge, "-o", self.tun, "-s", net,
                                     "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                                     *tag, "-j", "ACCEPT")),
            ]
            if self.host_address is not None:
                rules.append(Rule(FILTER, chain, ("-i", bridge, "-o", self.tun, "-s", net,
                                                  "-d", f"{self.host_address}/32", *tag,
                                                  "-j", "ACCEPT")))
            rules.append(Rule(RAW, PREROUTING, ("-i", self.tun, "-d", net, *tag, "-j", "ACCEPT")))
        for link in self._bridge_links:
            sides = ((link.bridge_a, link.subnet_a), (link.bridge_b, link.subnet_b))
            for (in_bridge, source), (out_bridge, dest) in (sides, sides[::-1]):
                match = (*_address("-s", source), *_address("-d", dest))
                rules.append(Rule(FILTER, chain, ("-i", in_bridge, "-o", out_bridge, *match,
                                                  *tag, "-j", "ACCEPT")))
                # Docker 28's raw DROP of `-d CONTAINER ! -i ITS_BRIDGE` stops linked traffic
                # too. Only with a known destination: a raw ACCEPT of all a bridge sends would
                # skip that filter for every other network as well.
                if dest is not None:
                    rules.append(Rule(RAW, PREROUTING, ("-i", in_bridge, *match, *tag,
                                                        "-j", "ACCEPT")))
        return list(dict.fromkeys(rules))

    def _guarded(self, listing: Listing, chain: str) -> bool:
        """Could this chain stop tunnel traffic? Only then do we add a rule to it; a chain
        with no rules and an ACCEPT policy cannot, and adding one would create its table."""
        if chain == DOCKER_USER or listing.policies.get(chain) in DROPPING_TARGETS:
            return True
        return any(_comment(r.tokens) != self.tag for r in listing.rules(chain))

    @staticmethod
    def _filter_chain(listing: Listing) -> str:
        return DOCKER_USER if DOCKER_USER in listing.chains else FORWARD

    def _own(self, rules: Iterable[Rule]) -> None:
        self._owned += [r for r in rules if r not in self._owned]

    def _remove_unwanted(self) -> bool:
        """Delete owned rules that are no longer desired; True if any was in the tables."""
        changed = False
        for rule in [r for r in self._owned if r not in self._desired]:
            if self._check(rule):
                self._delete(rule)
                changed = True
            self._owned.remove(rule)
        return changed

    @staticmethod
    def _state(rule: Rule, listing: Listing, dropping: set[str]) -> str:
        """"ok", "missing", or "shadowed" (a rule above ours drops or jumps to a dropping
        chain). Conservative: the DROP's matches are not evaluated, so any DROP above counts;
        moving ours up costs nothing when it would not have matched."""
        key = rule_key(rule.spec)
        entries = listing.rules(rule.chain)
        for index, entry in enumerate(entries):
            if rule_key(entry.tokens) == key:
                above = (_target(e.tokens) for e in entries[:index])
                shadowed = any(t in DROPPING_TARGETS or t in dropping for t in above)
                return "shadowed" if shadowed else "ok"
        return "missing"

    def _list(self, table: str) -> Listing:
        return parse_listing(table, self._run(["-t", table, "-S"]).stdout)

    def _check(self, rule: Rule) -> bool:
        # Exit code 1 is "no such rule" (or no such chain, which the insert then reports).
        result = self._run(["-t", rule.table, "-C", rule.chain, *rule.spec], absent_ok=True)
        return result.returncode == 0

    def _insert(self, rule: Rule) -> None:
        self._run(["-t", rule.table, "-I", rule.chain, "1", *rule.spec])

    def _delete(self, rule: Rule) -> None:
        self._run(["-t", rule.table, "-D", rule.chain, *rule.spec])

    def _run(self, args: list[str], absent_ok: bool = False) -> subprocess.CompletedProcess[str]:
        return run_iptables(
            self._runner, [self.backend, "-w", LOCK_WAIT, *args], absent_ok=absent_ok,
            not_found="iptables is not installed in the agent image; install it (e.g. `apk "
                      "add iptables`) so the agent can open Docker's firewall",
            compare="compare with `iptables-save` in the Docker VM")


def run_iptables(runner: Runner, argv: list[str], *, absent_ok: bool, not_found: str,
                 compare: str, hint: Callable[[str], str | None] = lambda _stderr: None
                 ) -> subprocess.CompletedProcess[str]:
    """One iptables command through `runner`; every failure is a one-line FirewallError
    that says what to do. With `absent_ok`, exit 1 ("no such rule") is an answer, not an
    error. `hint` may name a cause particular to the caller's rules from iptables' stderr;
    `compare` is the last resort."""
    command = shlex.join(argv)
    try:
        result = runner(argv)
    except FileNotFoundError:
        raise FirewallError(f"{not_found} (`{argv[0]}` not found)") from None
    except subprocess.TimeoutExpired:
        raise FirewallError(
            f"`{command}` did not finish within {COMMAND_TIMEOUT:.0f} s; check that no "
            f"process hangs holding the xtables lock"
        ) from None
    except OSError as exc:
        raise FirewallError(f"cannot run `{command}`: {exc}") from None
    if result.returncode == 0 or (absent_ok and result.returncode == 1):
        return result
    stderr = " ".join((result.stderr or "").split()) or "no error output"
    if result.returncode == 4 or "lock" in stderr:
        why = f"another program held the xtables lock for over {LOCK_WAIT} s; retry"
    elif "Permission denied" in stderr or "must be root" in stderr:
        why = "the agent needs root (CAP_NET_ADMIN) in the Docker VM"
    else:
        why = hint(stderr) or compare
    raise FirewallError(f"`{command}` failed (exit {result.returncode}): {stderr}; {why}")
