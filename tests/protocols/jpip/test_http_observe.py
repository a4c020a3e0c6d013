"""Early pre-emption (JpipResource.observe) with access control on: owners only."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from imageshare.auth.tokens import TokenError
from imageshare.protocols.jpip.http import JpipResource
from imageshare.web.pipeline import ScannedRequest


class _Server:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def preempt(self, cid: str, arrival: int, owner: str | None = None) -> None:
        self.calls.append((cid, arrival, owner))


async def _authenticate(header: bytes | None) -> Any:
    if header != b"Bearer good":
        raise TokenError("bad")
    return SimpleNamespace(issuer="iss", subject="alice")


def _scanned(token: bytes) -> ScannedRequest:
    return ScannedRequest(1, b"GET", b"/jpip?cid=JPH_abc&fsiz=64,64", ((b"authorization", token),), b"")


def test_observe_preempts_only_as_the_authenticated_principal() -> None:
    """With an authenticator, observe hands the verified principal to preempt (which cuts only
    for the session's owner); an unverifiable token pre-empts nothing."""
    server = _Server()
    resource = JpipResource(server, authenticate=_authenticate)  # type: ignore[arg-type]
    resource.observe(_scanned(b"Bearer good"), 5)
    resource.observe(_scanned(b"Bearer forged"), 6)
    assert server.calls == [("JPH_abc", 5, "iss\x00alice")]


def test_observe_without_access_control_preempts_at_once() -> None:
    """Access control off: observe pre-empts at once, with no owner check."""
    server = _Server()
    JpipResource(server).observe(_scanned(b""), 7)  # type: ignore[arg-type]
    assert server.calls == [("JPH_abc", 7, None)]
