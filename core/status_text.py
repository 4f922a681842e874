"""`ctun status` as text: the one wording of a daemon's state, for the CLI and the TUI."""

from __future__ import annotations

import time
from typing import Any


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def format_route_table(table: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'SUBNET':<20} {'SOURCE':<28} {'STATE':<16} DETAIL"]
    for d in table:
        lines.append(f"{d['subnet']:<20} {d['source']:<28} {d['state']:<16} {d['detail']}")
    return lines


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"ctun {status['role']} {status['version']}  interface {status['interface']}  "
        f"{status['transport']} {status['local_endpoint'][0]}:{status['local_endpoint'][1]}  "
        f"up {status['uptime']:.0f} s",
    ]
    if status.get("wire"):  # legacy mode: say so on every status, it is not safe
        lines.append(f"wire: {status['wire']}")
    lines += format_config(status)  # first: a config that did not load must not be missed
    lines += format_peers(status["peers"])
    if status.get("drops"):
        drops = ", ".join(f"{k} {v}" for k, v in sorted(status["drops"].items()))
        lines.append(f"unauthenticated drops: {drops}")
    lines += format_transport_losses(status.get("transports", []))
    docker = status.get("docker")
    if docker:
        reason = f" ({docker['error']})" if docker.get("error") else ""
        lines.append(f"docker: {docker['state']}{reason}   agent: {status.get('agent', '-')}")
    lines += format_agent(status)
    if status.get("route_table"):
        lines += format_route_table(status["route_table"])
    elif "routes" in status:
        lines.append("routes: " + (", ".join(status["routes"]) or "none"))
    for problem in status.get("route_problems", []):
        lines.append(f"warning: {problem}")
    lines += format_access(status.get("access"))
    lines += format_extras(status)
    return "\n".join(lines)


def format_agent(status: dict[str, Any]) -> list[str]:
    """The VM side as its agent reports it: the firewall, and the DNS responder."""
    lines = []
    view = status.get("agent_view") or {}
    if view.get("firewall"):
        fw = view["firewall"]
        state = f"error: {fw['error']}" if fw.get("error") else \
            f"{fw.get('backend')}, {fw.get('rules')} rules"
        shown = view.get("bridges", {})
        bridges = ", ".join(f"{k} -> {v}" for k, v in sorted(shown.items()))
        more = view.get("bridges_total", len(shown)) - len(shown)
        if more > 0:
            bridges += f" and {more} more"
        lines.append(f"agent firewall: {state}" + (f"; bridges: {bridges}" if bridges else ""))
    if isinstance(view.get("dns"), dict):
        lines.append(format_agent_dns(view["dns"]))
    return lines


def format_sharing(status: dict[str, Any]) -> list[str]:
    """What docker-connector users call its features: sharing with accessors, subnet
    links, hosts names and proxies, then the agent's side of them (the TUI's Sharing tab)."""
    lines = format_access(status.get("access")) + format_extras(status)
    if not lines or lines == ["sharing: off"]:
        lines = ["nothing shared: no expose listener, links, hosts or proxy in the config"]
    return lines + format_agent(status)


def format_agent_dns(dns: dict[str, Any]) -> str:
    """The agent's DNS responder for hosts names: where it listens, or why it does not."""
    if dns.get("error"):
        state = f"error: {dns['error']}"
    else:
        state = f"listening on {dns.get('listen')}, {_count(dns.get('names', 0), 'name')}"
    if dns.get("redirect_error"):
        state += f"; redirect error: {dns['redirect_error']}"
    else:
        state += f", {_count(dns.get('redirects', 0), 'redirect rule')}"
    return (f"agent DNS: {state}; answered {dns.get('answered')}, "
            f"nxdomain {dns.get('nxdomain')}, refused {dns.get('refused')}, "
            f"malformed {dns.get('malformed')}")


def format_transport_losses(transports: list[dict[str, Any]]) -> list[str]:
    """Frames a transport lost (a full queue or socket buffer): the tunnel's own loss, which
    the peers' counters cannot show, since the frames never reached the far end."""
    lines = []
    for transport in transports:
        lost = {k: v for k, v in transport.get("stats", {}).items()
                if k.startswith("dropped_") and v}
        if lost:
            lines.append(f"transport {transport['name']} lost: "
                         + ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in sorted(lost.items())))
    return lines


def format_extras(status: dict[str, Any]) -> list[str]:
    """docker-connector's extras, where configured: subnet links, hosts names, proxies."""
    lines = []
    if status.get("links"):
        lines.append("links: " + ", ".join(f"{a}+{b}" for a, b in status["links"]))
    if status.get("links_problem"):
        lines.append(f"warning: {status['links_problem']}")
    hosts = status.get("hosts")
    if isinstance(hosts, dict) and (hosts.get("files") or hosts.get("problems")):
        lines.append(f"hosts: {_count(len(hosts.get('names', [])), 'name')} for "
                     f"{', '.join(hosts.get('suffixes', [])) or 'marked lines'} "
                     f"from {', '.join(hosts.get('files', []))}")
        lines += [f"warning: hosts: {p}" for p in hosts.get("problems", [])]
    proxy = status.get("proxy")
    for entry in proxy.get("proxies", []) if isinstance(proxy, dict) else []:
        error = f" ({entry['error']})" if entry.get("error") else ""
        lines.append(f"proxy: {entry['listen']} -> {entry['target']} {entry['protocol']}, "
                     f"{entry['state']}{error}, {entry['active']} open")
    return lines


def format_access(part: Any) -> list[str]:
    """Sharing: the host's expose listener and accessors, or an accessor's own settings."""
    if not isinstance(part, dict):
        return []
    if "expose" not in part:  # `ctun access` itself
        if not part.get("address"):
            return ["access: waiting for the host's settings (nothing routed yet)"]
        return [f"access: {part['address']} via {part['host_address']}, MTU {part['mtu']}, "
                f"routes: {', '.join(part['routes']) or 'none'}"]
    expose = part["expose"]
    if expose.get("listen"):
        lines = [f"sharing: listening on {'+'.join(expose['transports'])} {expose['listen']}, "
                 f"exposed: {', '.join(expose['routes']) or 'nothing'}"]
    else:
        lines = ["sharing: off"]
    lines += [f"  accessor {a['name']} {a['ip']} ({a['origin']}): {a['state']}"
              for a in part.get("accessors", [])]
    lines += [f"warning: {p}" for p in part.get("problems", [])]
    return lines


def format_config(status: dict[str, Any]) -> list[str]:
    """The config file's state: an error that keeps the last good config running, changes
    that wait for a restart, and other problems the daemon reports."""
    part = status.get("config")
    lines = []
    error = None
    if isinstance(part, dict):  # a daemon from before hot reload sent just the file name
        error = part.get("error")
        if error:
            loaded = time.strftime("%H:%M:%S", time.localtime(part.get("loaded_at") or 0))
            lines.append(f"CONFIG ERROR: {error}")
            lines.append(f"  still running the config loaded at {loaded}; "
                         "the file is applied as soon as it is fixed")
        if part.get("restart_needed"):
            lines.append("config changed, applied at the next start: "
                         + ", ".join(part["restart_needed"]))
    lines += [f"problem: {p}" for p in status.get("problems", []) if p != f"config: {error}"]
    return lines


def format_peers(peers: list[dict[str, Any]]) -> list[str]:
    lines = []
    header = f"{'PEER':<8} {'STATE':<11} {'ENDPOINT':<22} {'HANDSHAKE':>9} {'RTT ms':>7} " \
             f"{'RX pkts':>9} {'RX bytes':>11} {'TX pkts':>9} {'TX bytes':>11}"
    lines.append(header)
    for p in peers:
        endpoint = f"{p['endpoint'][0]}:{p['endpoint'][1]}" if p["endpoint"] else "-"
        age = f"{p['handshake_age']:.0f} s" if p["handshake_age"] is not None else "-"
        rtt = f"{p['rtt_ms']:.2f}" if p["rtt_ms"] is not None else "-"
        lines.append(f"{p['name']:<8} {p['state']:<11} {endpoint:<22} {age:>9} {rtt:>7} "
                     f"{p['rx_packets']:>9} {p['rx_bytes']:>11} {p['tx_packets']:>9} "
                     f"{p['tx_bytes']:>11}")
        if p.get("transport"):
            line = f"{'':<8} over {p['transport']}"
            if p.get("switches"):
                last = p["switches"][-1]
                line += (f"; {p['switch_count']} switch(es), last {last['from']} -> "
                         f"{last['to']}: {last['reason']}")
            lines.append(line)
        if p["drops"]:
            drops = ", ".join(f"{k} {v}" for k, v in sorted(p["drops"].items()))
            lines.append(f"{'':<8} drops: {drops}")
    return lines
