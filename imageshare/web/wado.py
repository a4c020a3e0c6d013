"""
``GET|HEAD /wado``: WADO-URI (PS3.18 chapter 9, IHE RAD-55).

Two parts:

* :class:`WadoRetriever` does the blocking work for one request, on the WADO pool: the
  catalog lookup, the ETag check, file reads, decoding, rendering and DICOM encoding.
* :class:`WadoResource` is the thin adapter: it parses the query (pure,
  :mod:`imageshare.wado.query`), hands it to the pool and writes the answer. Nothing
  blocking runs on the reactor.

Request values are never used as paths: the object is found by its UID in the catalog,
and only the catalog's paths are opened. Error reasons never repeat request values.

De-identification (``anonymize=yes``) maps UIDs with a salted hash. The salt is random,
made once per data directory and kept in the catalog's settings (never logged or sent):
the same object gets the same pseudonymous UIDs on every request and after restarts, so
a receiver can fetch a study in pieces, and nobody without the catalog can recompute the
mapping from the original UIDs.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
from pathlib import Path
from typing import Any

import attrs
from pydicom import dcmread
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imageshare.audit.identity import served_record
from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.auth.guard import grant_for, principal_of
from imageshare.dicom import derived
from imageshare.fairqueue import FairQueue, QueueFull
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.logthrottle import RefusalLog
from imageshare.store.archive import Archive
from imageshare.store.records import InstanceRow, State
from imageshare.transcode import openjpeg
from imageshare.wado import render
from imageshare.wado.cache import ResponseCache
from imageshare.wado.query import (
    DEFAULT_QUALITY,
    JPEG2000_LOSSLESS,
    JPIP_SYNTAXES,
    Delivery,
    WadoError,
    WadoQuery,
    negotiate,
    parse_query,
)
from imageshare.web.clients import ClientKey, peer_address
from imageshare.web.cors import Cors, add_vary

__all__ = ["Answer", "WadoRetriever", "WadoResource", "SALT_SETTING"]

log = Logger(namespace="imageshare.wado")
# A client can provoke refusals as fast as it can send: one line per client and status.
refusals = RefusalLog(log)

#: Catalog setting holding the de-identification salt (hex).
SALT_SETTING = "wado.deidentify_salt"
# Tries when the object is replaced (re-received) while it is being read.
_ATTEMPTS = 3
# Enough of a codestream to hold its main header (SIZ, COD, COC: our codestreams' are small).
_MAIN_HEADER_READ = 16384
_NATIVE_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@attrs.frozen
class Answer:
    """A response: status, body and the headers that depend on the object."""

    status: int
    body: bytes = b""
    content_type: str = ""
    etag: str | None = None
    #: The instance sent, for the audit trail (:class:`~imageshare.audit.identity.ServedRecord`); 200 only.
    record: Any = attrs.field(default=None, eq=False, repr=False)


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match (RFC 9110 13.1.2): weak comparison, ``*`` matches any object."""
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


class WadoRetriever:
    """Answers one parsed WADO-URI request. Blocking: call it on the WADO pool.

    Parameters
    ----------
    catalog : ICatalog
        Where objects are found.
    archive : Archive
        Where their archived Part 10 files are.
    data_dir : Path
        Root of the frames' codestream paths.
    public_url : str
        Base of the Pixel Data Provider URL of JPIP Referenced objects.
    cache : ResponseCache or None
        Answers kept by ETag; ``None`` keeps none.
    decode_threads : int
        OpenJPEG threads per decode (a reduced view of a large image decodes faster).
    """

    def __init__(
        self, catalog: ICatalog, archive: Archive, data_dir: Path, *, public_url: str,
        cache: ResponseCache | None = None, decode_threads: int = 1, patients: Any = None,
    ) -> None:
        self._catalog = catalog
        # An imageshare.auth.patients.PatientAccess: tokens naming a patient see only theirs.
        self._patients = patients
        self._archive = archive
        self._data_dir = data_dir
        self._public_url = public_url
        self._cache = cache
        self._decode_threads = decode_threads
        self._salt: bytes | None = None
        self._lock = threading.Lock()

    def _secret(self) -> bytes:
        with self._lock:
            if self._salt is None:
                self._salt = bytes.fromhex(self._catalog.ensure_setting(SALT_SETTING, secrets.token_hex(32)))
            return self._salt

    def __call__(self, query: WadoQuery, if_none_match: str | None = None, patient: str | None = None,
                 study: str | None = None, grant: str | None = None) -> Answer:
        """
        ``patient``, ``study``: the principal sees only that patient's, or that study's,
        objects (others answer as missing ones). ``grant``: a URL grant for the query's study,
        put in a JPIP-referenced header's Pixel Data Provider URL; such an answer is one
        principal's own, so it is neither cached nor given an ETag.
        """
        for _ in range(_ATTEMPTS):
            row = self._find(query, patient, study)
            try:
                delivery = negotiate(
                    query,
                    is_image=self._is_image(row),
                    streamable=row.state is State.STREAMABLE,
                    original_syntax=row.transfer_syntax_uid,
                )
                personal = grant is not None and not delivery.rendered and delivery.transfer_syntax in JPIP_SYNTAXES
                etag = None if personal else self._etag(row, delivery)
                if etag is not None and _etag_matches(if_none_match, etag):
                    return Answer(304, etag=etag)
                cached = self._cache.get(etag) if self._cache is not None and etag is not None else None
                if cached is not None:
                    return Answer(200, cached[1], cached[0], etag, served_record(self._catalog, row))
                body = self._rendered(row, delivery) if delivery.rendered else self._dicom(
                    row, delivery, grant if personal else None)
            except FileNotFoundError:
                continue  # re-received or transcoded meanwhile: the files read are replaced
            if self._catalog.get_instance(row.sop_instance_uid) == row:
                if self._cache is not None and etag is not None:
                    self._cache.put(etag, delivery.content_type, body)
                return Answer(200, body, delivery.content_type, etag, served_record(self._catalog, row))
        raise WadoError(503, "the object changed or its files are unavailable; try again")

    def _find(self, query: WadoQuery, patient: str | None = None, study: str | None = None) -> InstanceRow:
        row = self._catalog.get_instance(query.object_uid)
        if row is None or (row.study_instance_uid, row.series_instance_uid) != (query.study_uid, query.series_uid):
            raise WadoError(404, "no such object in this study and series")
        if study is not None and row.study_instance_uid != study:
            # A URL grant opens its one study; another answers exactly as a missing object.
            raise WadoError(404, "no such object in this study and series")
        if patient is not None and (self._patients is None
                                    or not self._patients.study_allowed(patient, row.study_instance_uid)):
            # Another patient's object answers exactly as a missing one.
            raise WadoError(404, "no such object in this study and series")
        return row

    def _is_image(self, row: InstanceRow) -> bool:
        if row.state in (State.STREAMABLE, State.NOT_STREAMABLE):
            return True
        if row.state is State.NOT_IMAGE:
            return False
        # Not classified yet (pending) or failed: an image has Rows.
        try:
            ds = dcmread(self._archive.path(row.path), stop_before_pixels=True, specific_tags=["Rows"])
        except FileNotFoundError:
            raise
        except Exception:  # unreadable: it will not render either
            return False
        return "Rows" in ds

    def _etag(self, row: InstanceRow, delivery: Delivery) -> str:
        # The salt and public URL shape de-identified and JPIP Referenced bodies; the state
        # says where the pixels come from (our codestreams or the original).
        server = hashlib.sha256(self._secret() + self._public_url.encode()).hexdigest()[:16]
        text = f"{row.sop_instance_uid}|{row.generation}|{row.state.value}|{server}|{delivery.key()}"
        return '"' + hashlib.sha256(text.encode()).hexdigest()[:40] + '"'

    # --- application/dicom ----------------------------------------------------------------

    def _dicom(self, row: InstanceRow, delivery: Delivery, grant: str | None = None) -> bytes:
        syntax = delivery.transfer_syntax
        assert syntax is not None
        data = self._archive.path(row.path).read_bytes()
        if syntax == row.transfer_syntax_uid and not delivery.anonymize:
            return data  # the archived object, byte for byte
        try:
            original = derived.read_part10(data)
        except ValueError:  # InvalidDicomError is one too
            raise WadoError(406, "the archived object cannot be parsed, only sent as it is") from None
        try:
            if syntax in JPIP_SYNTAXES:
                url = derived.jpip_url(self._public_url, row.sop_instance_uid, grant)
                ds = derived.jpip_referenced(original, self._catalog.frames(row.sop_instance_uid), url)
            elif syntax == JPEG2000_LOSSLESS:
                codestreams = [
                    (self._data_dir / f.codestream_path).read_bytes()
                    for f in self._catalog.frames(row.sop_instance_uid)
                ]
                ds = derived.jpeg2000_lossless(original, codestreams)
            elif syntax == row.transfer_syntax_uid:
                ds = original
            else:
                ds = derived.native(original)
            if delivery.anonymize:
                ds = derived.deidentify(ds, salt=self._secret())
            return derived.encode(ds, syntax)
        except derived.DerivationError as e:
            raise WadoError(406, f"the object cannot be produced in that transfer syntax: {e}") from None

    # --- image/jpeg, image/png --------------------------------------------------------------

    def _rendered(self, row: InstanceRow, delivery: Delivery) -> bytes:
        path = self._archive.path(row.path)
        if row.state is State.STREAMABLE:
            frames = self._catalog.frames(row.sop_instance_uid)
            if not 1 <= delivery.frame_number <= len(frames):
                raise WadoError(400, f"frameNumber is beyond the object's {len(frames)} frame(s)")
            frame = frames[delivery.frame_number - 1]
            photometry = render.photometry_of(dcmread(path, stop_before_pixels=True))
            if not photometry.grey:
                photometry = attrs.evolve(photometry, bits_stored=frame.precision)
            full = (frame.width, frame.height)
            box = render.crop_box(*full, delivery.region)
            size = render.output_size(box[2] - box[0], box[3] - box[1], delivery.rows, delivery.columns)
            with open(self._data_dir / frame.codestream_path, "rb") as f:
                head = f.read(_MAIN_HEADER_READ)
            reduce = render.choose_reduce(full, box, size, render.decomposition_levels(head))
            if reduce == 0 and photometry.grey and row.transfer_syntax_uid in _NATIVE_LE:
                # Full resolution of an uncompressed original: its own pixels (the same
                # values, the codestream is lossless) are a read away, a full decode is not.
                pixels = self._decode(dcmread(path), delivery.frame_number)
            else:
                codestream = (self._data_dir / frame.codestream_path).read_bytes()
                pixels = openjpeg.decode(codestream, reduce=reduce, threads=self._decode_threads)
        else:
            reduce = 0
            try:
                ds = dcmread(path)
            except FileNotFoundError:
                raise
            except Exception:  # a failed instance may be unreadable
                raise WadoError(406, "the archived object cannot be parsed for rendering") from None
            photometry = render.photometry_of(ds)
            count = int(ds.get("NumberOfFrames") or 1)
            if not 1 <= delivery.frame_number <= count:
                raise WadoError(400, f"frameNumber is beyond the object's {count} frame(s)")
            pixels = self._decode(ds, delivery.frame_number)
            full = (pixels.shape[1], pixels.shape[0])
            box = render.crop_box(*full, delivery.region)
            size = render.output_size(box[2] - box[0], box[3] - box[1], delivery.rows, delivery.columns)
        return render.render(
            pixels,
            photometry,
            box=box,
            size=size,
            reduce=reduce,
            window=delivery.window,
            content_type=delivery.content_type,
            quality=delivery.quality or DEFAULT_QUALITY,
        )

    @staticmethod
    def _decode(ds: Any, frame_number: int) -> Any:
        """One frame with pydicom (colour as RGB), for objects we have no codestreams of."""
        if "PixelData" not in ds:
            raise WadoError(406, "the object has no integer pixel data to render")
        try:
            pixels = pixel_array(ds, index=frame_number - 1)
            if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, ds)
        except Exception as e:  # pydicom and its plugins raise many types on bad data
            log.info("cannot decode pixels: {error}", error=type(e).__name__)
            raise WadoError(406, "the object's pixels cannot be decoded for rendering") from None
        return pixels


class WadoResource(Resource):
    """``/wado``: parses on the reactor, does everything else on the WADO pool.

    Parameters
    ----------
    retriever : callable
        ``retriever(query, if_none_match) -> Answer``, blocking (a :class:`WadoRetriever`).
    queue : FairQueue
        The WADO pool's queue: clients take turns for its workers, and a client with too
        many requests waiting gets 503 at once.
    client_key : callable
        Names the client of a request (the peer address).
    cors_origins : tuple of str
        Origins allowed to read the responses from a browser (``*`` for any):
        ``[http] cors_origins``, see :mod:`imageshare.web.cors`.
    audit : AuditTrail
        Where each object sent by a GET is recorded (110104 R, RAD-55; not 304s or HEAD):
        the row the retriever found, with its patient read on the same worker.
    """

    isLeaf = True

    def __init__(self, retriever: Any, queue: FairQueue, *, client_key: ClientKey = peer_address,
                 cors_origins: tuple[str, ...] = (), audit: AuditTrail = NO_AUDIT) -> None:
        super().__init__()
        self._audit = audit  # ATNA: 110104 R (RAD-55) for each object sent
        self._retriever = retriever
        self._queue = queue
        self._client_key = client_key
        # A viewer's script revalidates with If-None-Match and reads the ETag; Accept is
        # listed because a long or unusual value is not safelisted.
        self._cors = Cors(cors_origins, methods=("GET", "HEAD"), allow_headers=("Accept", "If-None-Match"),
                          expose=("Content-Type", "ETag", "Retry-After"))

    def render_GET(self, request: Request) -> int | bytes:
        if request.postpath and request.postpath != [b""]:
            return self._refuse(request, WadoError(404, "WADO-URI is served at /wado only"))
        _, _, raw_query = request.uri.partition(b"?")
        try:
            query = parse_query(raw_query, request.getHeader(b"accept"))
        except WadoError as e:
            return self._refuse(request, e)
        if not query.content_types:
            # Accept chooses the type (without one, the default: sending one could change
            # it), so every answer from here on (200, 304, 406, 400 for a mismatch) varies.
            add_vary(request, "Accept")
        # Everything else (catalog, files, decoding) blocks: on the pool, in the client's turn.
        header = request.getHeader(b"if-none-match")
        if_none_match = header.decode("latin-1") if header else None
        principal = principal_of(request)
        retriever = self._retriever
        restrictions: dict[str, Any] = {}
        if principal is not None and principal.patient is not None:
            restrictions["patient"] = principal.patient
        if principal is not None and principal.study is not None:
            restrictions["study"] = principal.study
        issue = grant_for(request)
        grant = issue(query.study_uid) if issue is not None else None
        if grant is not None:
            restrictions["grant"] = grant  # for a JPIP-referenced header's Pixel Data Provider URL
        if restrictions:
            retriever = functools.partial(retriever, **restrictions)
        try:
            d = self._queue.submit(self._client_key(request), retriever, query, if_none_match)
        except QueueFull as e:
            request.setHeader(b"retry-after", str(e.retry_after).encode("ascii"))
            return self._refuse(request, WadoError(503, e.reason))
        finished: list[Any] = []
        request.notifyFinish().addBoth(finished.append)
        # A client that goes away takes its waiting request out of the queue.
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def done(result: Answer | Failure) -> None:
            if finished or (isinstance(result, Failure) and result.check(CancelledError)):
                return  # the client went away: its job was dropped, or its answer is not wanted
            if isinstance(result, Answer):
                self._write(request, result)
                if result.record is not None and request.method == b"GET":  # an object was sent
                    self._audit.instances_served("WADO", peer_address(request), [result.record], principal)
            else:
                if result.check(WadoError):
                    error = result.value
                else:
                    log.failure("WADO request for {sop_instance_uid} failed", result,
                                sop_instance_uid=query.object_uid)
                    error = WadoError(500, "internal error")
                request.write(self._refuse(request, error, sop_instance_uid=query.object_uid))
                request.finish()

        d.addBoth(done)
        return NOT_DONE_YET

    render_HEAD = render_GET

    def render(self, request: Request) -> int | bytes:
        if request.method == b"OPTIONS":
            return self._cors.preflight(request)
        self._cors.apply(request)  # errors too: a script may read why it was refused
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD, OPTIONS")
            return self._refuse(request, WadoError(405, "WADO-URI answers GET and HEAD only"))
        return super().render(request)  # type: ignore[no-any-return]

    @staticmethod
    def _write(request: Request, answer: Answer) -> None:
        request.setResponseCode(answer.status)
        request.setHeader(b"cache-control", b"private")
        if answer.etag is not None:
            request.setHeader(b"etag", answer.etag.encode("ascii"))
        if answer.status != 304:
            request.setHeader(b"content-type", answer.content_type.encode("ascii"))
            request.setHeader(b"content-length", str(len(answer.body)).encode("ascii"))
            request.write(answer.body)
        request.finish()

    @staticmethod
    def _refuse(request: Request, error: WadoError, **fields: Any) -> bytes:
        """Set up a plain-text error and return its body; logged at info.

        Only a validated object UID is logged with it, never other request values.
        """
        client = peer_address(request)
        refusals.info((client, error.status), "WADO request from {client} refused: {status} {reason}",
                      client=client, status=error.status, reason=error.reason, **fields)
        body = error.reason.encode("ascii", "replace") + b"\n"
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body
