"""
``twistd imageshare``: command-line options and the composition root.

This is the only module that imports the global reactor, and only inside
:func:`makeService`, so that ``twistd -r <reactor>`` and pytest-twisted can install theirs
first.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from imageshare.config import Config, ConfigError, load


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the ImageShare server: DICOM listener, JPEG 2000 transcoding and the HTTP "
        "services. Without --config the embedded defaults are used (state in ./var)."
    )
    optParameters = [
        ["config", "c", None, "The INI configuration file (see etc/imageshare.ini)."],
    ]

    def postOptions(self) -> None:
        try:
            self["parsed"] = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"bad configuration: {e}") from None


def makeService(options: Options, reactor: Any = None) -> Any:
    """Build the service tree for twistd."""
    from imageshare.service import make_service

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["parsed"]
    return make_service(config, reactor)
