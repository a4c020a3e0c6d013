"""Study manifests end to end: dcmtk sends a study, the running server publishes its KOS."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import task, threads

from imageshare.dicom.manifest import KOS_SOP_CLASS
from imageshare.store.records import State
from tests.dicom.dciodvfy import dcmdump_ok, validate
from tests.helpers import make_instances
from tests.integration.conftest import run_with_deadline

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
    pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools is not installed"),
]


async def storescu(server: Any, folder: Path) -> None:
    result = await threads.deferToThread(
        run_with_deadline,
        ["storescu", "-aet", "MODALITY", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
         "+sd", str(folder)],
    )
    assert result.returncode == 0, result.stderr


async def manifest_other_than(server: Any, study: str, old: str | None, timeout: float = 30) -> str:
    """The study's manifest in force once it is not ``old``; polls the catalog off the reactor."""
    from twisted.internet import reactor

    catalog = server.service.catalog
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sources = await threads.deferToThread(catalog.manifest_sources, study)
        if sources is not None and sources.current_uid not in (None, old):
            return str(sources.current_uid)
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"no new manifest for {study} within {timeout} s")


def get_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/status", timeout=10) as r:
        return json.load(r)  # type: ignore[no-any-return]


def listed(path: Path) -> set[str]:
    ds = dcmread(path)
    return {r.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence}


@pytest_twisted.ensureDeferred
async def test_manifest_built_then_rebuilt(start_server, tmp_path: Path) -> None:
    """Three instances sent with storescu get a manifest once the study is quiet; a fourth sent
    later replaces it with a new one (new SOP Instance UID, the old one gone). The manifest
    is an instance of the study (not_image after classification) and its archived file is
    a valid XDS-I manifest for dciodvfy."""
    server = await start_server(manifest={"stable_after": "0.5"})
    files = make_instances(tmp_path / "all", 4, seed="manifest-e2e")
    (tmp_path / "first").mkdir()
    (tmp_path / "later").mkdir()
    for f in files[:3]:
        shutil.copy(f, tmp_path / "first")
    shutil.copy(files[3], tmp_path / "later")
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    catalog = server.service.catalog

    await storescu(server, tmp_path / "first")
    first = await manifest_other_than(server, study, None)
    await server.service.transcoder.when_idle()
    row = await threads.deferToThread(catalog.get_instance, first)
    assert row is not None
    assert (row.sop_class_uid, row.study_instance_uid, row.state) == (KOS_SOP_CLASS, study, State.NOT_IMAGE)
    first_file = server.data_dir / "archive" / row.path
    assert listed(first_file) == sent - {str(dcmread(files[3], stop_before_pixels=True).SOPInstanceUID)}
    status = await threads.deferToThread(get_status, server.url)
    assert status["manifests"] == 1

    await storescu(server, tmp_path / "later")
    second = await manifest_other_than(server, study, first)
    await server.service.transcoder.when_idle()
    assert await threads.deferToThread(catalog.get_instance, first) is None
    assert not first_file.exists()
    row = await threads.deferToThread(catalog.get_instance, second)
    assert row is not None and row.state is State.NOT_IMAGE and row.study_instance_uid == study
    path = server.data_dir / "archive" / row.path
    assert listed(path) == sent

    ds = dcmread(path)
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert series.RetrieveAETitle == server.ae_title
    assert series.RetrieveLocationUID.startswith("2.25.")  # generated, kept for this data directory
    assert series.RetrieveURL == server.service.config.http.public_url + "/wado"
    errors, _ = await threads.deferToThread(validate, path, "IHEXDSIManifest")
    assert errors == []
    assert await threads.deferToThread(dcmdump_ok, path)
    counts = await threads.deferToThread(catalog.counts)
    assert (counts.instances, counts.not_image, counts.series) == (5, 1, 2)
