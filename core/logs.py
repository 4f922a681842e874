"""Logging that never blocks the packet path: records go through a queue to one writer thread."""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys


def setup(level: str = "INFO") -> logging.handlers.QueueListener:
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                                          "%H:%M:%S"))
    listener = logging.handlers.QueueListener(records, stream)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)
    listener.start()
    return listener
