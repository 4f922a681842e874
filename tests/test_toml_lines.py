"""Where each value of a TOML file was written (core/toml_lines.py), for FILE:LINE errors."""

from __future__ import annotations

import tomllib
from typing import Any

from ctun.core.legacy_config import toml_key
from ctun.core.toml_lines import value_lines
from hypothesis import given, settings
from hypothesis import strategies as st

SAMPLE = '''# a comment
mtu = 1400  # trailing
routes = [
  "10.0.0.0/8",   # first

  # a comment line inside the array
  "172.17.0.0/16",
]
a.b.c = 'dotted'
s = """one
two "quoted" \\""" still
three"""
t = \'\'\'raw \\ "x"
\'\'\'
when = 1979-05-27 07:32:00
[docker]
follow = true
[peers."my-laptop"]
key = "a\\"b"
allowed = ["1.2.3.4/32", { x = 1, y = [2,
  3] }]
[[hosts]]
file = "/etc/hosts"
[[hosts]]
suffixes = [".a",
 ".b"]
["quoted table"]
"k k" = 1
'''


def test_every_value_of_a_sample_has_its_line() -> None:
    lines = value_lines(SAMPLE)
    assert {label: lines[label] for label in (
        "mtu", "routes", "routes[0]", "routes[1]", "a", "a.b.c", "s", "t", "when", "docker",
        "docker.follow", "peers", "peers.my-laptop", "peers.my-laptop.key",
        "peers.my-laptop.allowed[1].y[1]", "hosts", "hosts[0]", "hosts[0].file", "hosts[1]",
        "hosts[1].suffixes[1]", '"quoted table"', '"quoted table"."k k"',
    )} == {
        "mtu": 2, "routes": 3, "routes[0]": 4, "routes[1]": 7, "a": 9, "a.b.c": 9, "s": 10,
        "t": 13, "when": 15, "docker": 16, "docker.follow": 17, "peers": 18,
        "peers.my-laptop": 18, "peers.my-laptop.key": 19, "peers.my-laptop.allowed[1].y[1]": 21,
        "hosts": 22, "hosts[0]": 22, "hosts[0].file": 23, "hosts[1]": 24,
        "hosts[1].suffixes[1]": 26, '"quoted table"': 27, '"quoted table"."k k"': 28,
    }


def labels(value: Any, label: str = "") -> list[str]:
    """Every label config.py could blame in a parsed document."""
    found = [label] if label else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += labels(item, f"{label}.{toml_key(key)}" if label else toml_key(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += labels(item, f"{label}[{i}]")
    return found


def test_all_labels_of_the_sample_are_found_and_crlf_counts_lines_alike() -> None:
    doc = tomllib.loads(SAMPLE)
    lines = value_lines(SAMPLE)
    assert set(labels(doc)) <= set(lines)
    assert value_lines(SAMPLE.replace("\n", "\r\n")) == lines


# TOML forbids control characters in strings and keys, even escaped ones in keys.
CHARS = st.characters(blacklist_categories=("Cs", "Cc"))
SCALARS = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.text(CHARS, max_size=8),
                    st.floats(allow_nan=False, allow_infinity=False))
KEYS = st.text(CHARS, min_size=1, max_size=6)


def render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[\n" + "".join(f"  {render(v)},\n" for v in value) + "]"
    return repr(value)


@given(st.dictionaries(KEYS, st.one_of(SCALARS, st.lists(SCALARS, max_size=4)), max_size=6),
       st.dictionaries(KEYS, st.dictionaries(KEYS, SCALARS, max_size=3), max_size=3))
@settings(max_examples=200, deadline=None)
def test_generated_documents_map_every_label_to_the_line_that_holds_it(
        top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> None:
    tables = {name: table for name, table in tables.items() if name not in top}
    text = "".join(f"{toml_key(k)} = {render(v)}\n" for k, v in top.items())
    for name, table in tables.items():
        text += f"[{toml_key(name)}]\n" + "".join(
            f"{toml_key(k)} = {render(v)}\n" for k, v in table.items())
    lines = value_lines(text)
    assert set(labels(tomllib.loads(text))) <= set(lines)
    rows = text.split("\n")

    def row(label: str) -> str:
        return rows[lines[label] - 1]

    for key, value in top.items():
        assert row(toml_key(key)).startswith(f"{toml_key(key)} = ")
        for i, item in enumerate(value if isinstance(value, list) else []):
            assert row(f"{toml_key(key)}[{i}]") == f"  {render(item)},"
    for name, table in tables.items():
        assert row(toml_key(name)) == f"[{toml_key(name)}]"
        for key in table:
            assert row(f"{toml_key(name)}.{toml_key(key)}").startswith(f"{toml_key(key)} = ")


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_text_gives_a_map_and_never_raises(text: str) -> None:
    assert isinstance(value_lines(text), dict)
