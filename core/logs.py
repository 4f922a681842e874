"""Logging that never blocks the packet path: records go through a queue to one writer thread."""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys

DEFAULT_LEVEL = "INFO"
# The config file's `loglevel` sets this logger's level (all of ctun's loggers are below it).
CTUN_LOGGER = "ctun"

# Set by setup(): the level the command line asked for, which a config file does not override.
_flag_level: str | None = None


def setup(level: str | None = DEFAULT_LEVEL) -> logging.handlers.QueueListener:
    """Log to stderr at `level`; None: no --log-level flag was given, so the config file's
    `loglevel` decides (apply_config_level), else INFO."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                                          "%H:%M:%S"))
    listener = logging.handlers.QueueListener(records, stream)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    use_flag_level(level)
    listener.start()
    return listener


def use_flag_level(level: str | None) -> None:
    """The --log-level flag's level for everything (None: not given; INFO, and the config
    file's `loglevel` may change ctun's own)."""
    global _flag_level
    _flag_level = level
    logging.getLogger().setLevel(level or DEFAULT_LEVEL)
    logging.getLogger(CTUN_LOGGER).setLevel(logging.NOTSET)


def apply_config_level(loglevel: str | None) -> None:
    """The config's `loglevel` ("debug".."error"; None: not set) for ctun's own loggers, at
    start and on every reload; a --log-level flag wins over it, as flags win over the file."""
    if _flag_level is not None:
        return
    logger = logging.getLogger(CTUN_LOGGER)
    level = logging.getLevelName(loglevel.upper()) if loglevel else logging.NOTSET
    if logger.level != level:
        logger.setLevel(level)
        logger.info("log level now %s (config loglevel)",
                       loglevel or f"{logging.getLevelName(logging.getLogger().level)} "
                       "(default)")
