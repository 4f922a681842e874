"""Which hosts-file entries are served to containers (docker-connector's `hosts` directive),
and how the host hands them to the agent."""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from ctun.core import messages
from ctun.core.config import HostsSource
from ctun.core.hosts_file import MAX_ENTRIES, MAX_PROBLEMS, read_entries, valid_name

HOST = IPv4Address("192.168.251.2")

SAMPLE = """\
# a typical developer's /etc/hosts
127.0.0.1   localhost
127.0.1.1   laptop
::1         localhost ip6-localhost
fe80::1%lo0 api.dev.local
127.0.0.1   api.dev.local  API2.Dev.Local.   # the app, run on the host
10.1.2.3    db.dev.local
10.1.2.4    cache.dev.local   # docker-connector:ignore
10.1.2.5    mail.example.com  # docker-connector:resolve
10.1.2.6    web.example.com
10.1.2.7    xdev.local notdev.local.example.com
10.1.2.9    db.dev.local   # a second address: the first one wins
999.1.2.3   broken.dev.local
10.1.2.10
10.1.2.11   bad_name!.dev.local ok.dev.local
10.1.2.12   a-very-long-label-of-many-many-characters.but-still.valid.dev.local
"""


def write(tmp_path: Path, text: str, name: str = "hosts") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_entries_under_the_suffixes_resolve_marks_and_host_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, SAMPLE)
    found = read_entries([HostsSource(path, (".dev.local",))], HOST)
    assert found.suffixes == ("dev.local",)
    assert found.entries == (
        ("api.dev.local", "192.168.251.2"),  # 127.0.0.1: the host, at its tunnel address
        ("api2.dev.local", "192.168.251.2"),  # case and the trailing dot do not matter
        ("db.dev.local", "10.1.2.3"),
        ("mail.example.com", "10.1.2.5"),  # docker-connector:resolve
        ("ok.dev.local", "10.1.2.11"),
    )
    assert found.problems == [
        f"{path}:13: '999.1.2.3' is not an IP address; line skipped",
        f"{path}:14: an address without a name; line skipped",
        f"{path}:15: 'bad_name!.dev.local' is not a host name of at most 64 characters; "
        "name skipped",
        f"{path}:16: 'a-very-long-label-of-many-many-characters.but-still.valid.dev.local' "
        "is not a host name of at most 64 characters; name skipped",
    ]


def test_every_loopback_address_is_the_host(tmp_path: Path) -> None:
    path = write(tmp_path, "127.8.9.10 a.dev.local\n127.255.255.254 b.dev.local\n"
                           "128.0.0.1 c.dev.local\n")
    found = read_entries([HostsSource(path, ("dev.local",))], HOST)
    assert dict(found.entries) == {"a.dev.local": "192.168.251.2",
                                   "b.dev.local": "192.168.251.2", "c.dev.local": "128.0.0.1"}


def test_the_suffix_itself_and_whole_labels_only(tmp_path: Path) -> None:
    path = write(tmp_path, "10.0.0.1 dev.local\n10.0.0.2 mydev.local\n10.0.0.3 a.b.dev.local\n")
    found = read_entries([HostsSource(path, ("dev.local",))], HOST)
    assert [name for name, _ in found.entries] == ["dev.local", "a.b.dev.local"]


def test_several_files_each_with_its_own_suffixes(tmp_path: Path) -> None:
    one = write(tmp_path, "10.0.0.1 a.one.test b.two.test\n", "one")
    two = write(tmp_path, "10.0.0.2 c.two.test a.one.test\n", "two")
    found = read_entries([HostsSource(one, ("one.test",)), HostsSource(two, ("two.test",))],
                         HOST)
    assert found.suffixes == ("one.test", "two.test")
    # b.two.test is in the first file, whose suffix is one.test only.
    assert found.entries == (("a.one.test", "10.0.0.1"), ("c.two.test", "10.0.0.2"))
    assert found.problems == []


def test_a_missing_or_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    unreadable = write(tmp_path, "10.0.0.1 a.dev.local\n", "locked")
    directory = tmp_path / "dir"
    directory.mkdir()
    good = write(tmp_path, "10.0.0.2 b.dev.local\n", "good")
    if os.geteuid() != 0:
        unreadable.chmod(0)
        sources = [missing, unreadable, directory, good]
    else:
        sources = [missing, directory, good]  # root reads anything
    found = read_entries([HostsSource(p, ("dev.local",)) for p in sources], HOST)
    assert found.entries == (("b.dev.local", "10.0.0.2"),)
    assert found.problems[0] == (f"{missing}: cannot read it (No such file or directory); "
                                 "no names from it")
    assert f"{directory}: cannot read it (Is a directory); no names from it" in found.problems
    assert len(found.problems) == len(sources) - 1


def test_binary_garbage_is_skipped_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(b"\xff\xfe\x00garbage\n10.0.0.1 a.dev.local\n\x00\x01 \x02\n"
                     b"10.0.0.2 caf\xc3\xa9.dev.local\n")
    found = read_entries([HostsSource(path, ("dev.local",))], HOST)
    assert found.entries == (("a.dev.local", "10.0.0.1"),)
    assert len(found.problems) == 3


def test_bad_and_too_many_suffixes(tmp_path: Path) -> None:
    path = write(tmp_path, "10.0.0.1 a.s1.test\n")
    suffixes = ("bad suffix", "x" * 41, *(f"s{i}.test" for i in range(1, 11)))
    found = read_entries([HostsSource(path, suffixes)], HOST)
    assert found.suffixes == tuple(f"s{i}.test" for i in range(1, 9))
    assert found.entries == (("a.s1.test", "10.0.0.1"),)
    assert len(found.problems) == 4
    assert "'bad suffix' is not a DNS name" in found.problems[0]
    assert found.problems[-1].endswith("'s10.test' ignored: at most 8 suffixes in all")


def test_limits_what_one_snapshot_carries_and_what_status_shows(tmp_path: Path) -> None:
    lines = [f"10.0.{i // 256}.{i % 256} n{i}.dev.local" for i in range(MAX_ENTRIES + 10)]
    lines += [f"bad{i}" for i in range(MAX_PROBLEMS + 10)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    found = read_entries([HostsSource(path, ("dev.local",))], HOST)
    assert len(found.entries) == MAX_ENTRIES
    assert len(found.problems) == MAX_PROBLEMS + 1
    assert found.problems[-1] == "... and 11 more problems"
    # And all of them fit the `hosts` messages.
    parts = messages.hosts_parts(list(found.entries))
    assert len(parts) == messages.MAX_PARTS
    for index, part in enumerate(parts):
        payload = messages.encode("hosts", 1, epoch=messages.MAX_EPOCH - 1, gen=1, part=index,
                                  parts=len(parts), suffixes=list(found.suffixes),
                                  entries=part)
        assert messages.parse(payload).body["entries"] == part


def test_the_biggest_part_fits_one_control_message() -> None:
    suffixes = [f"s{i}." + "x" * 36 for i in range(messages.MAX_SUFFIXES)]
    entry = ["n" * messages.MAX_NAME, "255.255.255.255"]
    payload = messages.encode("hosts", messages.MAX_EPOCH - 1, epoch=messages.MAX_EPOCH - 1,
                              gen=messages.MAX_EPOCH - 1, part=63, parts=64,
                              suffixes=suffixes,
                              entries=[entry] * messages.HOSTS_PER_PART)
    assert len(payload) <= messages.MAX_CONTROL


@pytest.mark.parametrize("name, ok", [
    ("a", True), ("a.b", True), ("a-b.c_d", True), ("x" * 63, True), ("x" * 64, False),
    ("a" * 30 + "." + "b" * 33, True), ("a" * 30 + "." + "b" * 34, False), ("-a", False),
    ("a-", False), ("a..b", False), (".a", False), ("", False), ("a b", False),
    ("café", False), ("A", False),
])
def test_valid_name(name: str, ok: bool) -> None:
    assert valid_name(name) is ok
