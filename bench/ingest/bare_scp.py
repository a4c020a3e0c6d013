#!/usr/bin/env python3
"""The baseline peer: a bare pynetdicom Storage SCP that only writes what it receives.

No parsing, no fsync, no index: the floor any pynetdicom-based server is measured against.
With ``--fsync`` it also makes each file durable (fsync of the file and of the folder)
before answering, which is what an acknowledged, durable ingest has to pay at least.
Prints "PORT <n>" once listening on 127.0.0.1 (port 0 = any free port).
"""

from __future__ import annotations

import argparse
import os
import sys

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--fsync", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)

    def on_store(event):  # type: ignore[no-untyped-def]
        path = os.path.join(a.out, f"{event.request.AffectedSOPInstanceUID}.dcm")
        with open(path, "wb") as f:
            f.write(event.encoded_dataset())
            if a.fsync:
                f.flush()
                os.fsync(f.fileno())
        if a.fsync:
            fd = os.open(a.out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return 0x0000

    ae = AE(ae_title="BARESCP")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", a.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        sys.stdin.read()  # run until the benchmark closes our stdin
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
