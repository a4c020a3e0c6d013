"""
Connections at once, in total and per client address: the accounting every listener shares.

The DICOM listener (:mod:`imageshare.protocols.dicom.server`) and the HTTP and JPIP aux
listeners (:mod:`imageshare.web.connections`) count their connections here, so that one
address cannot take every slot and many addresses together cannot take more than the total.

Pure: no sockets, no locking (the DICOM listener's accept thread locks around it; the
HTTP listeners use it on the reactor thread only).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ConnectionCaps", "Over"]

#: Which cap refused a connection.
Over = Literal["per-address", "total"]


class ConnectionCaps:
    """
    Counts open connections; admits one only below both caps.

    Parameters
    ----------
    max_total
        Connections at once, from everyone.
    max_per_address
        Connections at once from one client address.
    """

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> Over | None:
        """Count a new connection from ``address``; if it is over a cap, count nothing and say which."""
        held = self._by_address.get(address, 0)
        if held >= self.max_per_address:
            return "per-address"
        if self.open >= self.max_total:
            return "total"
        self._by_address[address] = held + 1
        self.open += 1
        return None

    def release(self, address: str) -> None:
        """An admitted connection from ``address`` closed (one it does not hold is ignored:
        a count never goes negative)."""
        held = self._by_address.get(address, 0)
        if held <= 0:
            return
        self.open -= 1
        if held == 1:
            del self._by_address[address]  # the table holds only addresses with connections
        else:
            self._by_address[address] = held - 1

    def held(self, address: str) -> int:
        """Connections open from ``address``."""
        return self._by_address.get(address, 0)
