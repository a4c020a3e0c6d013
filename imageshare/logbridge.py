"""
Send what pynetdicom, pydicom and glymur log through stdlib ``logging`` to twisted.logger.

pydicom's warnings name the values they complain of (``Invalid value for VR DA:
'19620231'`` is a patient's birth date), so they go to the log at debug level only, and
the same warnings raised through :mod:`warnings` are not shown (twistd would log those at
warn level).
"""

from __future__ import annotations

import logging
import warnings

from twisted.logger import LogLevel

from imageshare.logsafe import Logger

#: Libraries whose messages quote data-set values: never above debug.
_QUOTES_VALUES = ("pydicom",)

_LEVELS = [
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
    (0, LogLevel.debug),
]


class TwistedLoggerHandler(logging.Handler):
    """
    A ``logging.Handler`` that emits to a ``twisted.logger.Logger``.

    Twisted's log observers must be thread-safe, so this may be called from pynetdicom's
    association threads. The stdlib message is passed as a field, never as the format.
    """

    def __init__(self, namespace: str = "imageshare.stdlib") -> None:
        super().__init__()
        self._log = Logger(namespace=namespace)

    def emit(self, record: logging.LogRecord) -> None:
        level = next(twisted for stdlib, twisted in _LEVELS if record.levelno >= stdlib)
        if record.name.split(".")[0] in _QUOTES_VALUES:
            level = LogLevel.debug
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        self._log.emit(level, "{logger}: {message}", logger=record.name, message=message)


def bridge_stdlib_logging(names: tuple[str, ...], level: int) -> TwistedLoggerHandler:
    """Attach one handler to the named stdlib loggers, at ``level``, not propagating."""
    handler = TwistedLoggerHandler()
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, TwistedLoggerHandler)]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    _ignore_value_warnings()
    return handler


def quiet_value_warnings() -> None:
    """
    In a process without the bridge (a transcoding worker): pydicom's messages that quote
    values are dropped rather than printed to stderr, which the server's log receives.
    """
    for name in _QUOTES_VALUES:
        logger = logging.getLogger(name)
        logger.handlers = [logging.NullHandler()]
        logger.propagate = False
    _ignore_value_warnings()


def _ignore_value_warnings() -> None:
    for name in _QUOTES_VALUES:
        # Their stdlib records say the same (at debug through the bridge); the warnings
        # would be shown at warn level, with the value.
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{name}(\.|$)")
