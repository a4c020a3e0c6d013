"""The pure parts of the Q/R SCP: the extended negotiation answer and the C-MOVE proposal."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from imageshare.dicom.derived import JPIP_REFERENCED
from imageshare.protocols.dicom.qr import move_contexts, relational_reply
from imageshare.store.query import Match
from imageshare.store.records import State

PATIENT_FIND, STUDY_FIND = "1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
CT = "1.2.840.10008.5.1.4.1.1.2"


def test_relational_reply() -> None:
    """Relational queries are granted for the Patient and Study Root FIND classes when asked
    for, with every other byte (date-time, fuzzy, time zone) answered 0; other SOP classes
    and empty items get no answer."""
    assert relational_reply({STUDY_FIND: b"\x01", PATIENT_FIND: b"\x01\x01\x01\x01\x01"}) == {
        STUDY_FIND: b"\x01", PATIENT_FIND: b"\x01\x00\x00\x00\x00"}
    assert relational_reply({STUDY_FIND: b"\x00\x01"}) == {STUDY_FIND: b"\x00\x00"}
    assert relational_reply({STUDY_MOVE: b"\x01", CT: b"\x01", PATIENT_FIND: b""}) == {}
    assert relational_reply({STUDY_FIND: b"\x01" * 1000}) == {STUDY_FIND: b"\x01" + bytes(7)}  # bounded


def test_move_contexts_offer_jpip_only_when_configured() -> None:
    """.94 is proposed, alone in its context, only for a destination configured to want it,
    and only for SOP classes with a streamable instance."""
    matches = [Match("1", CT, str(ExplicitVRLittleEndian), "a", State.STREAMABLE),
               Match("2", CT, str(JPEG2000Lossless), "b", State.STREAMABLE)]

    def proposed(jpip: bool) -> set[tuple[str, tuple[str, ...]]]:
        return {(str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
                for cx in move_contexts(matches, jpip=jpip)}

    plain = {(CT, (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))), (CT, (str(JPEG2000Lossless),))}
    assert proposed(False) == plain
    assert proposed(True) == plain | {(CT, (str(JPIP_REFERENCED),))}
