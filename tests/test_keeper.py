"""The agent's worker threads (vm/keeper.py): the newest offered state is applied, a round
with nothing new refreshes, a failing round is logged and the next one still runs."""

from __future__ import annotations

import logging
import threading

import pytest
from ctun.lab.topology import wait_until
from ctun.vm.keeper import Keeper, Ticker

log = logging.getLogger("ctun.test.keeper")
SLOW = 60.0  # seconds: no round comes from the timer while a test runs


class Recorder:
    def __init__(self) -> None:
        self.applied: list[int] = []
        self.refreshes = 0
        self.release = threading.Event()  # holds the first apply until the test says so
        self.busy = threading.Event()

    def apply(self, state: int) -> None:
        self.busy.set()
        self.release.wait(5)
        self.applied.append(state)

    def refresh(self) -> None:
        self.refreshes += 1


def test_only_the_newest_of_the_states_offered_meanwhile_is_applied() -> None:
    recorder = Recorder()
    keeper: Keeper[int] = Keeper("test-keeper", apply=recorder.apply,
                                 refresh=recorder.refresh, every=SLOW, log=log, what="test")
    keeper.offer(1)
    keeper.start()
    try:
        wait_until(recorder.busy.is_set, 5, what="the first apply")
        for state in (2, 3, 4):  # while the worker is busy: only 4 may follow 1
            keeper.offer(state)
        recorder.release.set()
        wait_until(lambda: recorder.applied == [1, 4], 5, what="the newest state")
        keeper.wake()  # nothing new: a refresh
        wait_until(lambda: recorder.refreshes == 1, 5, what="a refresh")
    finally:
        keeper.stop()
    assert recorder.applied == [1, 4]


def test_a_failing_round_is_logged_and_the_next_one_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []

    def tick() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("boom")

    ticker = Ticker("test-ticker", tick, every=SLOW, log=log, what="test feature")
    with caplog.at_level(logging.ERROR, logger=log.name):
        ticker.start()
        try:
            wait_until(lambda: len(rounds) == 1, 5, what="the first round")
            ticker.wake()
            wait_until(lambda: len(rounds) == 2, 5, what="a round after the failure")
        finally:
            ticker.stop()
    assert [r.getMessage() for r in caplog.records] == ["test feature: update failed"]


def test_stop_ends_the_thread() -> None:
    ticker = Ticker("test-ticker", lambda: None, every=SLOW, log=log, what="test")
    ticker.start()
    ticker.stop()
    assert not any(t.name == "test-ticker" for t in threading.enumerate())
