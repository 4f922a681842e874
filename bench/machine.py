"""What a result was measured on: kernel, CPU, cores, date, ctun version and checkout."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

from .. import __version__

CHECKOUT = Path(__file__).resolve().parent.parent


def cpu_model(cpuinfo: str) -> str:
    """The first "model name" of /proc/cpuinfo text (x86), else its "Hardware"/"Model" (arm)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    for key in ("model name", "Hardware", "Model", "cpu model"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or "unknown"


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def git_revision() -> str | None:
    """The checkout's commit (with "+changes" if it has uncommitted ones), when it is one:
    figures from a run mean little without the code they measured."""
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def describe() -> dict[str, str | int | None]:
    return {
        "kernel": platform.release(),
        "cpu": cpu_model(_read("/proc/cpuinfo")),
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "ctun": __version__,
        "git": git_revision(),
    }


def header_lines(info: dict[str, str | int | None]) -> list[tuple[str, str]]:
    version = f"ctun {info['ctun']}" + (f" (git {info['git']})" if info.get("git") else "")
    return [
        ("machine", f"Linux {info['kernel']}, {info['cpu']}, {info['nproc']} CPUs"),
        ("date", str(info["date"])),
        ("version", f"{version}, Python {info['python']}"),
    ]
