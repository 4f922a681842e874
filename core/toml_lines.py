"""Where each value of a TOML file was written, so an error about a value can say FILE:LINE.

tomllib gives positions only for syntax errors; a value that parses but is wrong ("mtu =
99999") would otherwise be named by its key alone. This scanner reads a document tomllib
has already accepted and maps every value's label, spelled as config.py spells them
("mtu", "routes[1]", "peers.db.allowed[0]", "hosts[0].suffixes[1]"), to its line.

It trusts its input to be valid TOML: on anything else it stops and returns what it has,
since a missing line only makes an error message less precise.
"""

from __future__ import annotations

import bisect
import contextlib
import re

from .legacy_config import toml_key

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_SPACE = " \t"
_ESCAPE = re.compile(r"\\(u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b"}


class _Stop(Exception):
    """The text is not what valid TOML would be here: keep what was found so far."""


def value_lines(text: str) -> dict[str, int]:
    """Each value's and table's label -> its 1-based line (the first, if repeated)."""
    scanner = _Scanner(text)
    # ValueError: str.index found no closing quote.
    with contextlib.suppress(_Stop, IndexError, ValueError):
        scanner.document()
    return scanner.lines


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[str, int] = {}
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._tables: dict[str, int] = {}  # an array of tables' label -> how many so far

    def line(self) -> int:
        return bisect.bisect_right(self._starts, self.pos)

    def record(self, label: str) -> None:
        self.lines.setdefault(label, self.line())

    # --- structure ------------------------------------------------------------------

    def document(self) -> None:
        table = ""
        while True:
            self.skip(newlines=True)
            if self.pos >= len(self.text):
                return
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                table = self.array_table(self.keys("]"))
                self.expect("]]")
            elif self.text[self.pos] == "[":
                self.pos += 1
                keys = self.keys("]")
                for end in range(1, len(keys) + 1):  # [peers.db] defines peers as well
                    self.record(self.join(keys[:end]))
                table = self.join(keys)
                self.expect("]")
            else:
                self.pair(table)
            self.skip()
            if self.pos < len(self.text) and self.text[self.pos] not in "\r\n":
                raise _Stop

    def array_table(self, keys: list[str]) -> str:
        name = self.join(keys)
        index = self._tables.get(name, 0)
        self._tables[name] = index + 1
        label = f"{name}[{index}]"
        self.record(name)
        self.record(label)
        return label

    def pair(self, table: str) -> None:
        line = self.line()  # the key's: where its value starts is no better a place
        keys = self.keys("=")
        for end in range(1, len(keys) + 1):  # a.b = 1 defines a as well
            self.lines.setdefault(self.join(keys[:end], table), line)
        label = self.join(keys, table)
        self.expect("=")
        self.skip()
        self.value(label)

    def keys(self, end: str) -> list[str]:
        """A dotted key, up to `end` (not consumed)."""
        parts = []
        while True:
            self.skip()
            parts.append(self.key())
            self.skip()
            if self.text.startswith(end, self.pos):
                return parts
            self.expect(".")

    def key(self) -> str:
        char = self.text[self.pos]
        if char in "\"'":
            return self.string()
        match = _BARE.match(self.text, self.pos)
        if match is None:
            raise _Stop
        self.pos = match.end()
        return match.group()

    @staticmethod
    def join(keys: list[str], table: str = "") -> str:
        label = ".".join(toml_key(k) for k in keys)
        return f"{table}.{label}" if table else label

    # --- values -------------------------------------------------------------------------

    def value(self, label: str) -> None:
        self.record(label)
        char = self.text[self.pos]
        if char == "[":
            self.pos += 1
            index = 0
            while True:
                self.skip(newlines=True)
                if self.text[self.pos] == "]":
                    break
                self.value(f"{label}[{index}]")
                index += 1
                self.skip(newlines=True)
                if self.text[self.pos] == ",":
                    self.pos += 1
            self.pos += 1
        elif char == "{":
            self.pos += 1
            self.skip()
            while self.text[self.pos] != "}":
                keys = self.keys("=")
                self.expect("=")
                self.skip()
                self.value(self.join(keys, label))
                self.skip()
                if self.text[self.pos] == ",":
                    self.pos += 1
                    self.skip()
            self.pos += 1
        elif char in "\"'":
            self.string()
        else:
            # A number, boolean or date: up to what ends a value (a date may hold a space).
            match = re.compile(r"[^,\]}\n#]+").match(self.text, self.pos)
            if match is None:
                raise _Stop
            self.pos = match.end()

    def string(self) -> str:
        """Any of TOML's four strings; the result matters only for keys (one-line strings)."""
        text = self.text
        for quote in ('"""', "'''"):
            if text.startswith(quote, self.pos):
                end = _closing(text, quote, self.pos + 3)
                # Up to two more quotes may close the string: """a"""" is 'a"'.
                while text.startswith(quote[0], end + 3):
                    end += 1
                body = text[self.pos + 3:end]
                self.pos = end + 3
                return body
        quote = text[self.pos]
        end = _closing(text, quote, self.pos + 1)
        body = text[self.pos + 1:end]
        self.pos = end + 1
        return _ESCAPE.sub(_unescape, body) if quote == '"' else body

    # --- the spaces between ----------------------------------------------------------

    def skip(self, newlines: bool = False) -> None:
        """Spaces and a comment; with `newlines`, any number of blank or comment lines."""
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in _SPACE or (newlines and char in "\r\n"):
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise _Stop
        self.pos += len(token)


def _closing(text: str, quote: str, start: int) -> int:
    """Where `quote` ends a string whose body starts at `start`; in a basic string (\"),
    an escaped quote does not (ValueError when nothing does)."""
    end = start
    while True:
        end = text.index(quote, end)
        if quote[0] == "'" or not _escaped(text, end):
            return end
        end += 1


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] in "uU" and len(code) > 1:
        return chr(int(code[1:], 16))
    return _ESCAPES.get(code, code)


def _escaped(text: str, at: int) -> bool:
    """Whether the quote at `at` is escaped: an odd number of backslashes before it."""
    count = 0
    while at - count - 1 >= 0 and text[at - count - 1] == "\\":
        count += 1
    return count % 2 == 1
