"""Send what pynetdicom, pydicom and glymur log through stdlib ``logging`` to twisted.logger."""

from __future__ import annotations

import logging

from twisted.logger import Logger, LogLevel

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
    return handler
