"""systemd (Linux): /etc/systemd/system/ctun.service, sandboxed to what the daemon uses.

The daemon runs as root, but its capability bounding set holds only CAP_NET_ADMIN, so root
keeps its file ownership and nothing else. Why each setting is there is written into the
unit itself (see UNIT_TEMPLATE) and into docs/services.md.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ... import __version__
from . import (
    Completed,
    Runner,
    ServiceError,
    ServiceFile,
    ServiceManager,
    ServiceOptions,
    execute,
)

UNIT_NAME = "ctun.service"
UNIT_PATH = PurePosixPath("/etc/systemd/system") / UNIT_NAME
SYSTEMD_RUNNING = PurePosixPath("/run/systemd/system")  # sd_booted(3)
STATE_DIR = "/var/lib/ctun"  # StateDirectory=ctun
RUN_DIR = "/run/ctun"  # RuntimeDirectory=ctun
HOME_DIRS = ("/home", "/root", "/run/user")  # what ProtectHome= covers

# CAP_NET_ADMIN: the tun device (TUNSETIFF), its address, link and routes (netlink), and
# net.ipv4.ip_forward. Nothing else: no raw or packet sockets, so no CAP_NET_RAW.
CAPABILITIES = ("CAP_NET_ADMIN",)
DAC_OVERRIDE = "CAP_DAC_OVERRIDE"


def run(argv: Sequence[str]) -> Completed:
    """The one runner of this backend: every systemctl call goes through here."""
    return execute(argv)


UNIT_TEMPLATE = """\
# Written by `ctun service install` (ctun {version}); `ctun service uninstall` removes it.
# Reinstalling rewrites this file: put local changes in a drop-in (systemctl edit ctun).

[Unit]
Description=ctun host daemon: reach Docker Desktop containers by IP
Wants=network-online.target
# After docker.service when the engine runs on this host; ctun follows the engine as it
# comes and goes, so it does not require it.
After=network-online.target docker.service

[Service]
Type=simple
ExecStart={exec_start}
{environment}Restart=on-failure
RestartSec=5
# Exit status 2 is a configuration or setup error (the journal says which): restarting
# cannot fix it.
RestartPreventExitStatus=2

# Privileges: root, keeping only the capabilities it uses.
{cap_comment}
CapabilityBoundingSet={capabilities}
NoNewPrivileges=yes

# Files: all read-only but its own state (keys, wheel cache) and run (control socket,
# crash records) directories. ProtectSystem= leaves /proc/sys writable, which the daemon
# needs (net.ipv4.ip_forward, the interface's disable_ipv6), so no ProtectKernelTunables=;
# a read-only /run does not stop connecting to the Docker socket.
ProtectSystem=strict
StateDirectory=ctun
StateDirectoryMode=0700
RuntimeDirectory=ctun
# Kept when the daemon stops: after a crash the next start finds the record there and
# undoes what the crashed run changed.
RuntimeDirectoryPreserve=yes
ReadWritePaths={state_dir} {run_dir}
ProtectHome={protect_home}
PrivateTmp=yes
UMask=0077

# Devices: /dev/net/tun, besides /dev/null and the like that "closed" keeps. Not
# PrivateDevices=, which would hide /dev/net/tun.
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw

# Kernel and sockets: UDP/TCP for the tunnel, netlink for links and routes, Unix for the
# control and Docker sockets. It configures the host's own network: no PrivateNetwork=.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# It enters or makes no namespaces (only ctun's test lab does) and mounts nothing.
RestrictNamespaces=yes
PrivateMounts=yes
ProtectProc=invisible
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""

_PLAIN_RE = re.compile(r"[A-Za-z0-9_@%+=:,./$-]+")


def quote_arg(arg: str) -> str:
    """One ExecStart= word: % and $ literal, quoted when it holds spaces or quotes."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN_RE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_environment(name: str, value: str) -> str:
    """One Environment= assignment; specifiers (%) are the only expansion there."""
    text = f"{name}={value}".replace("%", "%%")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _under_home(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in HOME_DIRS)


def _permits(st: os.stat_result, bits: int) -> bool:
    """Whether uid 0 / gid 0 without CAP_DAC_* may do `bits` (4 r, 2 w, 1 x) here."""
    if st.st_uid == 0:
        have = (st.st_mode >> 6) & 7
    elif st.st_gid == 0:
        have = (st.st_mode >> 3) & 7
    else:
        have = st.st_mode & 7
    return have & bits == bits


def blocked_without_dac(path: str, bits: int) -> str | None:
    """Why root holding only CAP_NET_ADMIN cannot use `path` (bits: 4 r, 2 w, 1 x), or None.

    Only what exists is judged: a missing path (Docker not running yet) is not an error.
    """
    p = Path(path)
    for d in [*reversed(p.parents), p]:
        try:
            st = os.stat(d)
        except OSError:
            return None
        need = bits if d == p else 1
        if d == p and stat.S_ISDIR(st.st_mode):
            need |= 1
        if not _permits(st, need):
            return f"{d} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
    return None


class SystemdManager(ServiceManager):
    backend = "systemd"
    service = UNIT_NAME

    def _default_runner(self) -> Runner:
        return run

    def _preflight(self) -> None:
        if not os.path.isdir(self._real(SYSTEMD_RUNNING)):
            raise ServiceError(f"this Linux does not run systemd (no {SYSTEMD_RUNNING}): "
                               f"start `ctun up --no-ui` from your init system instead")

    # -- the unit --------------------------------------------------------------------------

    def sandbox(self, options: ServiceOptions) -> tuple[str, list[str], list[str]]:
        """(ProtectHome= value, capabilities, notes): what the daemon needs to reach its
        interpreter, package, config and Docker socket."""
        needs: list[tuple[str, int]] = [(options.python, 1), (os.path.realpath(options.python), 1)]
        if options.package_dir:
            needs.append((options.package_dir, 5))
        if options.config:
            needs.append((options.config, 4))
        if options.docker_socket:
            needs.append((options.docker_socket, 2))
        protect_home = "yes"
        notes = []
        homes = [p for p, _ in needs if _under_home(p)]
        if homes:
            protect_home = "read-only"
            notes.append(f"ProtectHome=read-only, not yes: the daemon needs {homes[0]}")
        caps = list(CAPABILITIES)
        for path, bits in needs:
            why = blocked_without_dac(path, bits)
            if why is not None:
                caps.append(DAC_OVERRIDE)
                notes.append(f"added {DAC_OVERRIDE}: root without it cannot reach {path} "
                             f"because of {why}; install ctun and its config outside home "
                             f"directories to avoid it")
                break
        return protect_home, caps, notes

    def render_unit(self, options: ServiceOptions) -> str:
        protect_home, caps, _notes = self.sandbox(options)
        lines = ["CAP_NET_ADMIN: the tun device, its address, link and routes, and ip_forward.",
                 "No CAP_NET_RAW: ctun opens no raw or packet sockets."]
        if DAC_OVERRIDE in caps:
            lines.append(f"{DAC_OVERRIDE}: a path it needs is closed to root without it "
                         f"(see `ctun service install`'s note).")
        else:
            lines.append("No CAP_DAC_OVERRIDE: root owns what it writes, and the Docker "
                         "socket is root:docker.")
        cap_comment = "\n".join(f"# {line}" for line in lines)
        environment = "".join(f"Environment={quote_environment(n, v)}\n"
                              for n, v in options.environment)
        return UNIT_TEMPLATE.format(
            version=__version__,
            exec_start=" ".join(quote_arg(a) for a in options.argv()),
            environment=environment,
            cap_comment=cap_comment,
            capabilities=" ".join(caps),
            state_dir=STATE_DIR,
            run_dir=RUN_DIR,
            protect_home=protect_home,
        )

    def _render(self, options: ServiceOptions) -> list[ServiceFile]:
        return [ServiceFile(UNIT_PATH, self.render_unit(options).encode(), 0o644)]

    def _notes(self, options: ServiceOptions) -> list[str]:
        return [f"note: {n}" for n in self.sandbox(options)[2]]

    # -- systemctl -------------------------------------------------------------------------

    def _activate(self, options: ServiceOptions, updating: bool) -> str:
        self._run(["systemctl", "daemon-reload"])
        if updating:
            self._run(["systemctl", "enable", UNIT_NAME])
            self._run(["systemctl", "restart", UNIT_NAME])
            return "enabled and restarted it"
        self._run(["systemctl", "enable", "--now", UNIT_NAME])
        return "enabled and started it"

    def _deactivate(self) -> list[str]:
        done = self._call(["systemctl", "disable", "--now", UNIT_NAME])
        if done.returncode != 0:
            return [f"`systemctl disable --now {UNIT_NAME}` failed: {done.reason()}"]
        return []

    def _after_removal(self) -> list[str]:
        done = self._call(["systemctl", "daemon-reload"])
        if done.returncode != 0:
            return [f"`systemctl daemon-reload` failed: {done.reason()}"]
        return []

    def _start(self) -> str:
        self._run(["systemctl", "start", UNIT_NAME])
        return f"started {UNIT_NAME}"

    def _stop(self) -> str:
        self._run(["systemctl", "stop", UNIT_NAME])
        return f"stopped {UNIT_NAME}"

    def _status(self) -> str:
        # 0 running, 3 not running: both are answers. 4: systemd does not know the unit.
        done = self._run(["systemctl", "status", UNIT_NAME], ok=(0, 3, 4))
        return done.output

    def _logs_hint(self) -> str:
        return f"journalctl -u {UNIT_NAME}"
