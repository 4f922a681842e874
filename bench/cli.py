"""`python -m ctun.bench [--json FILE] [--quick] [--transports udp,tcp] [--docker]`.

Exit status: 0 every figure measured, 1 some failed (the table says which and why), 2 bad
input or a machine that cannot run it, 130 interrupted. Progress goes to stderr, so stdout
is only the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from . import machine, report, run
from .configs import Settings
from .measure import one_line

PROG = "ctun.bench"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_TRANSPORTS = "udp,tcp"
TOOLS = {"ip": "iproute2", "ping": "iputils-ping", "ss": "iproute2", "iperf3": "iperf3"}


class UsageError(Exception):
    """Bad input or an unfit machine; str() is the one line to print."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line that says what to fix, instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Measure ctun against a plain route in a namespace lab "
                "(needs root): TCP and UDP throughput, ping RTT, CPU, start-up times, TCP "
                "with the TUI attached (needs tmux).")  # fmt: skip
    p.add_argument("--json", metavar="FILE", type=Path,
                   help="also write every figure, raw iperf3 summaries included, to FILE")
    p.add_argument("--quick", action="store_true",
                   help="2 s runs, 1 s UDP probes and 50 pings (for tests; noisier figures)")
    p.add_argument("--transports", metavar="LIST", default=DEFAULT_TRANSPORTS,
                   help="comma-separated ctun transports to measure, in order (default "
                   f"{DEFAULT_TRANSPORTS}); udp adds a run with offloads off")
    p.add_argument("--docker", action="store_true",
                   help="also time `docker network create` to a reachable container "
                   "(starts dockerd if needed; the first time builds images)")
    return p  # fmt: skip


def known_transports() -> list[str]:
    """Every transport the installed plugins provide (third-party ones included)."""
    from ..core import plugins

    return sorted(plugins.transports(plugins.create_manager()))


def parse_transports(text: str, known: list[str]) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise UsageError(f"--transports {text!r}: empty name; give e.g. {DEFAULT_TRANSPORTS}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"--transports: unknown transport {unknown[0]!r} "
                         f"(available: {', '.join(known) or 'none'})")  # fmt: skip
    if len(set(names)) != len(names):
        raise UsageError(f"--transports {text!r}: a transport is named twice")
    return names


def check_writable(path: Path) -> None:
    """Fail now, not after minutes of measuring, if the JSON could not be written."""
    if path.is_dir():
        raise UsageError(f"--json {path}: is a directory")
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UsageError(f"--json {path}: cannot write it: {exc.strerror or exc}") from None
    if not existed:
        path.unlink(missing_ok=True)


def check_machine() -> None:
    if not sys.platform.startswith("linux"):
        raise UsageError("needs Linux (network namespaces and tun devices)")
    if os.geteuid() != 0:
        raise UsageError("needs root (network namespaces, tun devices): run it with sudo")
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            raise UsageError(f"needs `{tool}`: apt-get install {package}")


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _settings_line(settings: Settings, quick: bool) -> str:
    plan = settings.plan
    return (f"{settings.seconds} s per TCP run, UDP probes of {settings.probe_seconds} s "
            f"(at most {plan.max_steps}, x{plan.factor} from {plan.start_pps} pps), "
            f"{settings.ping_count} pings" + (" (--quick)" if quick else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        transports = parse_transports(args.transports, known_transports())
        if args.json is not None:
            check_writable(args.json)
        check_machine()
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    # SIGTERM and a closed terminal clean up exactly like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    settings = Settings.for_run(args.quick)
    info = machine.describe()
    try:
        results = run.measure_all(transports, settings, _progress)
        once = [*run.tui_figures(results), run.route_figure(_progress),
                run.docker_figure(args.docker, _progress)]  # fmt: skip
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; everything it made is removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the lab itself could not be built: nothing was measured
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED

    header = [*machine.header_lines(info), ("runs", _settings_line(settings, args.quick))]
    print(report.render(header, results, once), flush=True)
    if args.json is not None:
        doc: dict[str, Any] = {
            "machine": info,
            "settings": {
                "quick": args.quick,
                "transports": transports,
                "tcp_seconds": settings.seconds,
                "udp_probe_seconds": settings.probe_seconds,
                "ping_count": settings.ping_count,
                "udp_plan": dataclasses.asdict(settings.plan),
            },
            "configs": [r.to_json() for r in results],
            "once": {f.key: f.to_json() for f in once},
        }
        try:
            args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"{PROG}: error: cannot write {args.json}: {exc.strerror or exc}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
    failed = any(r.failed or r.errors for r in results) or any(f.failed for f in once)
    return EXIT_FAILED if failed else 0
