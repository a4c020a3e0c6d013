"""
Safe defaults: refuse a configuration that would open patient data to the network.

A listener reachable from beyond the machine (not on a loopback address, or on every
address) must be protected:

* HTTP (``[http] listen``) and the JPIP aux port (``[jpip] tcp_listen``): by bearer tokens
  (``[auth] mode = bearer``) or by client certificates (``ssl:`` with ``caCerts``);
* DICOM (``[dicom] listen``): by a calling-AE list for every operation (``store``,
  ``query`` and ``retrieve``, each its own list or ``allowed_calling_aets``) or by client
  certificates (``ssl:`` with ``caCerts``).

``[auth] insecure_remote = yes`` says the exposure is wanted (a closed network, a proxy that
authenticates). Pure: no I/O beyond what the endpoint parsers check (files named in them).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from imageshare.endpoints import parse_dicom_endpoint, parse_server_endpoint

if TYPE_CHECKING:
    from imageshare.config import Config

_ALLOW = "set [auth] insecure_remote = yes to allow it"


def is_loopback(interface: str | None) -> bool:
    """Whether a listener bound to ``interface`` is reachable only from this machine
    (empty: every address, so no)."""
    if not interface:
        return False
    host = interface.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure(config: "Config") -> tuple[str, str, str] | None:
    """The first unprotected listener reachable from the network, as (section, key,
    reason), or ``None``."""
    if config.auth.insecure_remote:
        return None
    base = config.path.parent if config.path is not None else None
    auth_mode = config.auth.mode
    for section, key, description in (("http", "listen", config.http.listen),
                                      ("jpip", "tcp_listen", config.jpip.tcp_listen)):
        if not description:
            continue
        endpoint = parse_server_endpoint(description, base)
        interface = endpoint.get("interface") or ""
        if endpoint.kind == "unix" or is_loopback(interface) or endpoint.verifies_clients:
            continue
        if auth_mode == "none":
            where = interface or "every address"
            return (section, key, f"listens on {where} with [auth] mode = none and no client certificates: "
                                  f"anyone on the network could read patient data ({_ALLOW})")
    dicom = parse_dicom_endpoint(config.dicom.listen)
    if not is_loopback(dicom.interface) and not (dicom.tls and dicom.ca_certs):
        open_to_all = [op for op in ("store", "query", "retrieve") if not config.dicom.calling_aets(op)]
        if open_to_all:
            return ("dicom", "listen", f"listens on {dicom.interface} without client certificates and with no "
                                       f"calling-AE list for {', '.join(open_to_all)}: any AE on the network "
                                       f"could {'/'.join(open_to_all)} ({_ALLOW})")
    return None


def unsafe_exposure(config: "Config") -> str | None:
    """One line saying why ``config`` would expose patient data beyond the machine without
    protection, or ``None`` (the start-up check; also for the audit trail)."""
    found = exposure(config)
    return None if found is None else f"[{found[0]}] {found[1]}: {found[2]}"
