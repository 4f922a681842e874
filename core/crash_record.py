"""The record a platform adapter keeps of what it changed, so a run after a crash can undo it.

Shared by the adapters; how each one locks the record (flock, Windows byte-range locks) and
what it tells a user who may not write it differ, so those stay in the adapters.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from .contracts import PlatformError


class CrashRecord:
    """A JSON object in `state_path`, written atomically."""

    @property
    def state_path(self) -> Path:
        raise NotImplementedError

    def _fs_error(self, action: str, path: Path, exc: OSError) -> PlatformError:
        """The one-line error for a record we cannot read or write; adapters add a hint."""
        return PlatformError(f"cannot {action} {path}: {exc.strerror or exc}")

    def read_record(self) -> dict[str, Any] | None:
        """The state file's contents; None when there is none, {} when it is unreadable."""
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fs_error("read", self.state_path, exc) from exc
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def write_record(self, record: dict[str, Any]) -> None:
        # Write-then-rename so a crash mid-write never leaves a truncated record.
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.state_path)
        except OSError as exc:
            raise self._fs_error("write", self.state_path, exc) from exc

    def remove_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
