"""Hot reload's file watching (ctun.core.config_watch) against real files and a real
HostContext; only the routing table and the engine are small fakes, since this is about
which change gets applied when, not about routes."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, cast

import pytest
from ctun.core import config, config_watch, control, logs, status_text
from ctun.core.config import HostConfig
from ctun.core.config_watch import ConfigWatch
from ctun.core.host_context import HostContext
from ctun.lab.topology import wait_until

NET = IPv4Network("10.5.0.0/16")
GOOD = 'mtu = 1400\n'


class FakeRoutes:
    """What HostContext.apply and the reload request use of HostRoutes."""

    def __init__(self) -> None:
        self.applied: list[HostConfig] = []

    def reconfigure(self, cfg: HostConfig) -> None:
        self.applied.append(cfg)

    def status(self) -> dict[str, Any]:
        routes = self.applied[-1].routes if self.applied else ()
        return {"route_table": [{"subnet": str(n)} for n in routes]}


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CTUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "ctun.toml")


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "ctun.toml"
    path.write_text(GOOD)
    return path


def make_ctx(path: Path) -> tuple[HostContext, FakeRoutes, contextlib.ExitStack]:
    cfg = config.load_host_config(str(path), {"key_file": str(path.parent / "vm.key")})
    routes = FakeRoutes()
    stack = contextlib.ExitStack()
    ctx = HostContext(cfg, cast(Any, None), cast(Any, None), cast(Any, routes), stack)
    return ctx, routes, stack


@pytest.fixture
def ctx(conf: Path) -> Iterator[HostContext]:
    context, _routes, stack = make_ctx(conf)
    with stack:
        yield context


def started(ctx: HostContext) -> ConfigWatch:
    """A watcher past its first poll, which takes the files as they are as applied."""
    watch = ConfigWatch(ctx)
    assert watch.poll() is False
    return watch


def settle(watch: ConfigWatch, polls: int = 3) -> int:
    """Poll a few times (what the thread does every 0.25 s); how many reloads were tried."""
    return sum(watch.poll() for _ in range(polls))


def append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:  # `cat >> FILE`: same inode, grows
        f.write(text)


def replace_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".swp")  # how editors save: write aside, rename over
    tmp.write_text(text)
    os.replace(tmp, path)


def test_an_appended_route_is_applied_after_the_file_holds_still(ctx: HostContext,
                                                                  conf: Path) -> None:
    watch = started(ctx)
    assert settle(watch) == 0 and not ctx.cfg.routes
    append(conf, f'routes = ["{NET}"]\n')
    assert watch.poll() is False  # changed: wait one poll, it may still be being written
    assert watch.poll() is True
    assert ctx.cfg.routes == (NET,)
    assert cast(FakeRoutes, ctx.routes).applied[-1].routes == (NET,)
    assert settle(watch) == 0  # once


def test_a_file_replaced_by_rename_is_seen_even_with_the_same_size_and_mtime(
        ctx: HostContext, conf: Path) -> None:
    watch = started(ctx)
    conf.write_text('routes = ["10.5.0.0/16"]\n')
    assert settle(watch) == 1
    old = time.time_ns() - 10 * config_watch.RECENT_NS  # long settled: stat alone decides
    os.utime(conf, ns=(old, old))
    assert settle(watch) == 0
    before = conf.stat()
    replace_by_rename(conf, 'routes = ["10.6.0.0/16"]\n')  # same length
    os.utime(conf, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    assert conf.stat().st_size == before.st_size
    assert settle(watch) == 1
    assert ctx.cfg.routes == (IPv4Network("10.6.0.0/16"),)


def test_a_rewrite_in_place_within_the_timestamp_granularity_is_seen(
        ctx: HostContext, conf: Path) -> None:
    # Same inode, same size, same mtime: only the content says it changed. The watcher keeps
    # reading a file whose mtime is recent, so this cannot slip through.
    watch = started(ctx)
    conf.write_text('routes = ["10.5.0.0/16"]\n')
    assert settle(watch) == 1
    before = conf.stat()
    with open(conf, "r+", encoding="utf-8") as f:
        f.write('routes = ["10.7.0.0/16"]\n')
    os.utime(conf, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert conf.stat().st_ino == before.st_ino
    assert settle(watch) == 1
    assert ctx.cfg.routes == (IPv4Network("10.7.0.0/16"),)


def test_an_old_unchanged_file_is_not_read_again(ctx: HostContext, conf: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old = time.time_ns() - 10 * config_watch.RECENT_NS
    os.utime(conf, ns=(old, old))
    watch = started(ctx)
    reads = []
    real_open = open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert settle(watch, 5) == 0
    assert reads == []  # stat only


def test_a_touch_without_a_change_reloads_nothing(ctx: HostContext, conf: Path) -> None:
    watch = started(ctx)
    for _ in range(5):
        os.utime(conf)
        assert watch.poll() is False
    assert watch.reloads == 0


def test_a_half_written_file_is_never_loaded(ctx: HostContext, conf: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    watch = started(ctx)
    full = f'mtu = 1400\nroutes = ["{NET}"]\n'
    conf.write_text(full[:20])  # an editor or a copy caught half-way: invalid TOML
    assert watch.poll() is False
    conf.write_text(full)  # finished before the next poll
    assert watch.poll() is False  # it changed again: wait once more
    with caplog.at_level(logging.INFO, logger="ctun"):
        assert watch.poll() is True
    assert ctx.cfg.routes == (NET,) and watch.error is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert watch.reloads == 1


def test_a_file_that_keeps_changing_is_applied_only_once_it_stops(ctx: HostContext,
                                                                  conf: Path) -> None:
    watch = started(ctx)
    for i in range(10):
        append(conf, f"# edit {i}\n")
        assert watch.poll() is False
    assert watch.reloads == 0
    assert watch.poll() is True and watch.reloads == 1
    assert settle(watch, 5) == 0


def test_an_invalid_file_keeps_the_last_good_config_and_says_where(
        ctx: HostContext, conf: Path, caplog: pytest.LogCaptureFixture) -> None:
    watch = started(ctx)
    append(conf, f'routes = ["{NET}"]\n')
    assert settle(watch) == 1
    good = ctx.cfg
    applied = len(cast(FakeRoutes, ctx.routes).applied)
    with caplog.at_level(logging.INFO, logger="ctun"):
        append(conf, "mtu = = 3\n")  # a malformed third line
        assert settle(watch, 8) == 1  # tried once for this content, not on every poll
        assert ctx.cfg is good and len(cast(FakeRoutes, ctx.routes).applied) == applied
        assert watch.error is not None
        assert str(conf) in watch.error and "line 3" in watch.error
        assert "\n" not in watch.error
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and watch.error in errors[0]  # logged once
        part = watch.status()
        assert part["config"]["error"] == watch.error
        assert part["problems"] == [f"config: {watch.error}"] == ctx.problems
        # A second, different mistake is a new error, logged once too.
        conf.write_text(f'routes = ["{NET}", "10.9.0.0/33"]\n')
        assert settle(watch, 8) == 1
        assert "10.9.0.0/33" in watch.error
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
        assert ctx.problems == [f"config: {watch.error}"]
        # Fixed: applied, and the error is gone from everywhere.
        conf.write_text(f'routes = ["{NET}", "10.9.0.0/24"]\n')
        assert settle(watch) == 1
    assert ctx.cfg.routes == (NET, IPv4Network("10.9.0.0/24"))
    assert watch.error is None and ctx.problems == []
    assert watch.status()["config"]["error"] is None


def test_a_deleted_config_file_is_an_error_not_an_empty_config(ctx: HostContext,
                                                               conf: Path) -> None:
    watch = started(ctx)
    append(conf, f'routes = ["{NET}"]\n')
    assert settle(watch) == 1
    kept = conf.read_text()
    conf.unlink()
    assert settle(watch) == 1
    assert ctx.cfg.routes == (NET,)  # not emptied
    assert watch.error is not None and str(conf) in watch.error and "gone" in watch.error
    conf.write_text(kept)
    assert settle(watch) == 1
    assert watch.error is None and ctx.cfg.routes == (NET,)


def test_a_rename_away_and_back_in_between_polls_is_nothing(ctx: HostContext,
                                                            conf: Path) -> None:
    watch = started(ctx)
    aside = conf.with_name("ctun.toml~")
    os.rename(conf, aside)
    assert watch.poll() is False  # gone for one poll only: not yet an error
    os.rename(aside, conf)
    assert settle(watch) == 0 and watch.error is None


def test_feature_files_reload_too_and_their_disappearance_is_an_error(
        ctx: HostContext, conf: Path, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    store = tmp_path / "peers.json"  # not there yet: a first `ctun peer add` creates it
    hosts.write_text("127.0.0.1 api.test\n")
    ctx.watched_files.append(lambda: [hosts, store])
    seen: list[HostConfig] = []
    ctx.on_reconfigure.append(seen.append)
    watch = started(ctx)
    assert settle(watch) == 0
    append(hosts, "127.0.0.1 db.test\n")
    assert settle(watch) == 1 and len(seen) == 1  # the features read their files again
    store.write_text("{}")
    assert settle(watch) == 1 and len(seen) == 2 and watch.error is None
    store.unlink()
    assert settle(watch) == 1 and len(seen) == 2  # not applied as an empty peer store
    assert watch.error is not None and str(store) in watch.error
    assert "stop naming it in the config file" in watch.error
    # The config file changing may be the user no longer naming it: that is applied.
    append(conf, f'routes = ["{NET}"]\n')
    assert settle(watch) == 1 and len(seen) == 3 and ctx.cfg.routes == (NET,)


def test_a_file_a_later_feature_registers_is_no_reason_to_reload(
        ctx: HostContext, tmp_path: Path) -> None:
    watch = started(ctx)  # set up first; the accessors feature registers its store after
    store = tmp_path / "peers.json"
    store.write_text("{}")
    ctx.watched_files.append(lambda: [store])
    assert settle(watch) == 0
    store.write_text('{"laptop": {}}')
    assert settle(watch) == 1


def test_a_file_the_new_config_names_does_not_cause_a_second_reload(
        ctx: HostContext, conf: Path, tmp_path: Path) -> None:
    extra = tmp_path / "hosts"
    extra.write_text("127.0.0.1 a.test\n")
    ctx.watched_files.append(lambda: [extra] if ctx.cfg.routes else [])
    watch = started(ctx)
    append(conf, f'routes = ["{NET}"]\n')
    assert settle(watch, 6) == 1


def test_a_fifo_config_is_read_once_and_not_watched(tmp_path: Path, conf: Path) -> None:
    ctx, _routes, stack = make_ctx(conf)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with stack:
        ctx.cfg = replace(ctx.cfg, source=str(fifo))
        watch = started(ctx)  # would hang on open() if it read the FIFO
        assert settle(watch) == 0 and watch.error is None
        fifo.unlink()
        assert settle(watch) == 0 and watch.error is None


def test_the_reload_request_is_the_same_reload(ctx: HostContext, conf: Path) -> None:
    watch = started(ctx)
    conf.write_text(f'routes = ["{NET}"]\nmtu = 1300\n')
    answer = watch.request({})
    assert answer == {"source": str(conf), "restart_needed": ["tunnel"],
                      "route_table": [{"subnet": str(NET)}]}
    assert ctx.cfg.routes == (NET,) and ctx.cfg.tunnel.mtu == 1400  # mtu waits
    assert watch.status()["config"]["restart_needed"] == ["tunnel"]
    assert settle(watch) == 0  # the watcher does not apply it a second time
    conf.write_text('routes = ["10.5.0.0/33"]\n')
    with pytest.raises(control.RequestError, match=r"^config not reloaded: .*10\.5\.0\.0/33"):
        watch.request({})
    assert ctx.cfg.routes == (NET,) and "10.5.0.0/33" in (watch.error or "")
    assert settle(watch) == 0  # nor retry what the request already found bad


def test_the_watcher_thread_applies_a_change_within_two_seconds(conf: Path) -> None:
    ctx, routes, stack = make_ctx(conf)
    with stack:
        config_watch.setup(ctx)
        assert "reload" in ctx.handlers
        started = time.monotonic()
        append(conf, f'routes = ["{NET}"]\n')
        wait_until(lambda: ctx.cfg.routes == (NET,), 2, what="the appended route")
        took = time.monotonic() - started
        assert took < 1.0  # detect (<= 0.25 s) + hold still (0.25 s) + load
        time.sleep(1)  # the absence of a storm: nothing else happens for four polls
        assert len(routes.applied) == 1
    print(f"watcher thread applied an appended route in {took:.2f} s")


def test_status_shows_a_config_error_first() -> None:
    status: dict[str, Any] = {
              "role": "host", "version": "0", "interface": "ctun0", "transport": "udp",
              "local_endpoint": ["127.0.0.1", 2511], "uptime": 3, "peers": [],
              "config": {"source": "/etc/ctun/ctun.toml", "loaded_at": 0,
                         "error": "/etc/ctun/ctun.toml: invalid TOML: ... (at line 3, column 7)",
                         "restart_needed": ["tunnel"]},
              "problems": ["config: /etc/ctun/ctun.toml: invalid TOML: ... (at line 3, column 7)",
                           "hosts: /etc/hosts.d/x: not readable"]}
    lines = status_text.format_status(status).splitlines()
    assert lines[1] == ("CONFIG ERROR: /etc/ctun/ctun.toml: invalid TOML: ... "
                        "(at line 3, column 7)")
    assert lines[2].startswith("  still running the config loaded at ")
    assert lines[3] == "config changed, applied at the next start: tunnel"
    assert lines[4] == "problem: hosts: /etc/hosts.d/x: not readable"
    quiet: dict[str, Any] = {**status, "problems": [], "config": {
        **status["config"], "error": None, "restart_needed": []}}
    assert status_text.format_status(quiet).splitlines()[1].startswith("PEER")


@pytest.fixture
def ctun_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(logs.CTUN_LOGGER)
    level, root_level = logger.level, logging.getLogger().level
    yield logger
    logs.use_flag_level(None)
    logger.setLevel(level)
    logging.getLogger().setLevel(root_level)


def test_a_reloaded_loglevel_sets_ctuns_level(ctx: HostContext,
                                              ctun_logger: logging.Logger) -> None:
    logs.use_flag_level(None)
    ctx.on_reconfigure.append(config_watch.apply_loglevel)
    ctx.apply(replace(ctx.cfg, loglevel="debug"))
    assert ctun_logger.level == logging.DEBUG
    assert logging.getLogger("ctun.daemon").isEnabledFor(logging.DEBUG)
    ctx.apply(replace(ctx.cfg, loglevel="warning"))
    assert not logging.getLogger("ctun.routes").isEnabledFor(logging.INFO)
    ctx.apply(replace(ctx.cfg, loglevel=None))  # the line removed: back to the default
    assert ctun_logger.level == logging.NOTSET
    assert logging.getLogger("ctun.routes").getEffectiveLevel() == logging.INFO


def test_a_log_level_flag_wins_over_the_config(ctx: HostContext,
                                               ctun_logger: logging.Logger) -> None:
    logs.use_flag_level("ERROR")
    ctx.on_reconfigure.append(config_watch.apply_loglevel)
    ctx.apply(replace(ctx.cfg, loglevel="debug"))
    assert ctun_logger.getEffectiveLevel() == logging.ERROR
