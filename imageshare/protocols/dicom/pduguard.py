"""
A bounded reading of the DICOM Upper Layer byte stream a peer sends us (PS3.8 9.3).

pynetdicom reads a PDU by trusting its header: it takes the 4-byte length at its word and
keeps reading until it holds that many bytes, before the AE title, the presentation
contexts or our maximum PDU length are looked at. One header claiming 4 GiB is 4 GiB of
memory. :class:`PduFramer` sees every byte before pynetdicom does and refuses a stream as
soon as a header announces more than we allow:

* a PDU type that does not exist (reason: unrecognized PDU);
* an A-ASSOCIATE-AC or -RJ (we are always the acceptor), a second A-ASSOCIATE-RQ, or a
  P-DATA-TF or A-RELEASE before the A-ASSOCIATE-RQ (unexpected PDU);
* an A-ASSOCIATE-RQ longer than :data:`MAX_ASSOCIATE_RQ` or shorter than its fixed
  fields, A-RELEASE and A-ABORT PDUs whose length is not 4, a P-DATA-TF longer than the
  negotiated maximum, PDV items that are too short or run past their PDU (invalid PDU
  parameter value);
* one DIMSE message whose data set (the PDV fragments up to the one flagged last) is
  larger than the configured maximum object size, or whose command set is larger than
  :data:`MAX_COMMAND` (reason not specified: a limit of ours, not a protocol error).

Only headers are buffered (at most 6 bytes); values are counted and passed on, never
kept. Pure: bytes in, verdicts out; the socket adapter is in :mod:`.server`.
"""

from __future__ import annotations

import struct

import attrs

ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07

# A-ABORT reason/diagnostic values for source 2, the service provider (PS3.8 9.3.8).
REASON_NOT_SPECIFIED = 0x00
UNRECOGNIZED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PARAMETER_VALUE = 0x06

#: Longest A-ASSOCIATE-RQ accepted: 128 presentation contexts with a dozen transfer
#: syntaxes each, role selection and extended negotiation for each, and a user identity
#: token (Kerberos, SAML or JWT) all fit many times over.
MAX_ASSOCIATE_RQ = 1 << 20
#: Largest command set of one DIMSE message. Real ones are a few hundred bytes.
MAX_COMMAND = 1 << 20
#: What a P-DATA-TF may add around the data set it carries when the maximum PDU length is
#: unlimited: the command set and the PDV item headers.
PDATA_OVERHEAD = MAX_COMMAND + 64

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
_PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, control header
_ASSOCIATE_FIXED = 68  # protocol version .. the reserved 32 bytes (PS3.8 Table 9-11)
_KNOWN = frozenset(range(ASSOCIATE_RQ, ABORT + 1))
_NAMES = {
    ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    ASSOCIATE_AC: "A-ASSOCIATE-AC",
    ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    RELEASE_RQ: "A-RELEASE-RQ",
    RELEASE_RP: "A-RELEASE-RP",
    ABORT: "A-ABORT",
}


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with ``reason`` (PS3.8 9.3.8)."""
    return _HEADER.pack(ABORT, 0, 4) + bytes((0, 0, 2, reason))


def max_pdata_length(max_pdu: int, max_object_size: int) -> int:
    """
    The longest P-DATA-TF we accept, as its length field counts (PS3.8 D.1).

    ``max_pdu`` is the Maximum Length we advertise; 0 advertises no limit, and then the
    largest object we store bounds a PDU instead.
    """
    return max_pdu if max_pdu > 0 else max_object_size + PDATA_OVERHEAD


@attrs.frozen
class Refusal:
    """Why a stream was refused, and what to put in the A-ABORT."""

    #: For the log: what was wrong. Never contains received values other than lengths.
    reason: str
    #: The A-ABORT reason/diagnostic (one of the constants above).
    abort_reason: int
    #: The PDU type of the header that was refused, if one was read.
    pdu_type: int | None = None
    #: The length the peer claimed: the PDU length, or the data or command set so far.
    claimed_length: int | None = None


class PduFramer:
    """
    Follows PDU and PDV boundaries in the bytes a peer sends; refuses what is too big.

    Parameters
    ----------
    max_pdata
        Longest P-DATA-TF (its length field), see :func:`max_pdata_length`.
    max_object_size
        Largest data set of one DIMSE message, summed over its PDV fragments.
    max_associate_rq, max_command
        Longest A-ASSOCIATE-RQ and largest command set.
    """

    def __init__(
        self,
        *,
        max_pdata: int,
        max_object_size: int,
        max_associate_rq: int = MAX_ASSOCIATE_RQ,
        max_command: int = MAX_COMMAND,
    ) -> None:
        self._max_pdata = max_pdata
        self._max_object = max_object_size
        self._max_rq = max_associate_rq
        self._max_command = max_command
        self._header = bytearray()  # a PDU header or, inside a P-DATA-TF, a PDV header
        self._pdu_type: int | None = None  # None: between PDUs
        self._pdu_left = 0  # bytes of the current PDU still to come
        self._pdv_left = 0  # bytes of the current PDV fragment still to come
        self._pdv_flags = 0
        self._command_bytes = 0  # of the DIMSE message being received
        self._dataset_bytes = 0
        #: True once a whole A-ASSOCIATE-RQ has come in: negotiation can start.
        self.associate_received = False
        #: The refusal, once there is one; every later call returns it again.
        self.refusal: Refusal | None = None
        #: Bytes accepted so far.
        self.received = 0

    def receive(self, data: bytes | bytearray | memoryview) -> Refusal | None:
        """
        Account for the next bytes of the stream.

        Returns
        -------
        Refusal or None
            ``None`` while the stream is acceptable; otherwise the reason to abort. Bytes
            after the point of refusal are not looked at.
        """
        if self.refusal is not None:
            return self.refusal
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if self._pdu_type is None:
                take = min(_HEADER.size - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) == _HEADER.size:
                    pdu_type, _, length = _HEADER.unpack(self._header)
                    self._header.clear()
                    self.refusal = self._start_pdu(pdu_type, length)
            elif self._pdu_type == P_DATA_TF:
                pos = self._pdata(view, pos, end)
            else:
                take = min(self._pdu_left, end - pos)
                pos += take
                self._pdu_left -= take
            if self.refusal is not None:
                return self.refusal
            if self._pdu_type is not None and self._pdu_left == 0:
                self._end_pdu()
        self.received += end
        return None

    def _start_pdu(self, pdu_type: int, length: int) -> Refusal | None:
        name = _NAMES.get(pdu_type, f"PDU type {pdu_type:#04x}")

        def refuse(why: str, reason: int) -> Refusal:
            return Refusal(f"{name} {why}", reason, pdu_type, length)

        if pdu_type not in _KNOWN:
            return Refusal(f"unknown PDU type {pdu_type:#04x}", UNRECOGNIZED_PDU, pdu_type, length)
        if pdu_type in (ASSOCIATE_AC, ASSOCIATE_RJ):
            return refuse("sent to an association acceptor", UNEXPECTED_PDU)
        if pdu_type == ASSOCIATE_RQ:
            if self.associate_received:
                return refuse("after the association was requested", UNEXPECTED_PDU)
            if length > self._max_rq:
                return refuse(f"longer than {self._max_rq} bytes", INVALID_PARAMETER_VALUE)
            if length < _ASSOCIATE_FIXED:
                return refuse("shorter than its fixed fields", INVALID_PARAMETER_VALUE)
        elif pdu_type == ABORT:
            if length != 4:
                return refuse("length is not 4", INVALID_PARAMETER_VALUE)
        elif not self.associate_received:
            return refuse("before the association was requested", UNEXPECTED_PDU)
        elif pdu_type in (RELEASE_RQ, RELEASE_RP):
            if length != 4:
                return refuse("length is not 4", INVALID_PARAMETER_VALUE)
        elif length > self._max_pdata:
            return refuse(f"longer than the maximum of {self._max_pdata} bytes", INVALID_PARAMETER_VALUE)
        elif length < _PDV_HEADER.size:
            return refuse("holds no PDV item", INVALID_PARAMETER_VALUE)
        self._pdu_type = pdu_type
        self._pdu_left = length
        return None

    def _end_pdu(self) -> None:
        if self._pdu_type == ASSOCIATE_RQ:
            self.associate_received = True
        self._pdu_type = None

    def _pdata(self, view: memoryview, pos: int, end: int) -> int:
        """Consume P-DATA-TF body bytes from ``pos``: PDV headers and fragments."""
        if self._pdv_left:
            take = min(self._pdv_left, end - pos)
            self._pdv_left -= take
            self._pdu_left -= take
            if not self._pdv_left:
                self._end_pdv()
            return pos + take
        take = min(_PDV_HEADER.size - len(self._header), end - pos, self._pdu_left)
        self._header += view[pos : pos + take]
        self._pdu_left -= take
        pos += take
        if len(self._header) < _PDV_HEADER.size:
            if not self._pdu_left:
                self.refusal = Refusal(
                    "PDV item header runs past the end of its P-DATA-TF", INVALID_PARAMETER_VALUE, P_DATA_TF
                )
            return pos
        item_length, _, flags = _PDV_HEADER.unpack(self._header)
        self._header.clear()
        fragment = item_length - 2  # the length counts the context ID and control header
        if fragment < 0:
            self.refusal = Refusal("PDV item shorter than its header", INVALID_PARAMETER_VALUE, P_DATA_TF, item_length)
        elif fragment > self._pdu_left:
            self.refusal = Refusal(
                "PDV item runs past the end of its P-DATA-TF", INVALID_PARAMETER_VALUE, P_DATA_TF, item_length
            )
        elif flags & 0x01:
            self._command_bytes += fragment
            if self._command_bytes > self._max_command:
                self.refusal = Refusal(
                    f"command set larger than {self._max_command} bytes",
                    REASON_NOT_SPECIFIED,
                    P_DATA_TF,
                    self._command_bytes,
                )
        else:
            self._dataset_bytes += fragment
            if self._dataset_bytes > self._max_object:
                self.refusal = Refusal(
                    f"data set larger than max_object_size ({self._max_object} bytes)",
                    REASON_NOT_SPECIFIED,
                    P_DATA_TF,
                    self._dataset_bytes,
                )
        if self.refusal is None:
            self._pdv_left = fragment
            self._pdv_flags = flags
            if not fragment:
                self._end_pdv()
        return pos

    def _end_pdv(self) -> None:
        if self._pdv_flags & 0x02:  # the last fragment of its command or data set
            if self._pdv_flags & 0x01:
                self._command_bytes = 0
            else:
                self._dataset_bytes = 0
