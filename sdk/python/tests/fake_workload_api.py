"""A SPIFFE Workload API served in-process on a unix socket, with py-spiffe's own generated
stubs: it streams the X.509-SVID it holds and streams again whenever the test rotates it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc


def _der_certs(pem: bytes) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER)
                    for c in x509.load_pem_x509_certificates(pem))


def response_from_dir(d: Path, spiffe_id: str) -> workload_pb2.X509SVIDResponse:
    key = serialization.load_pem_private_key((d / "svid.key").read_bytes(), password=None)
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    svid = workload_pb2.X509SVID(
        spiffe_id=spiffe_id,
        x509_svid=_der_certs((d / "svid.pem").read_bytes()),
        x509_svid_key=key_der,
        bundle=_der_certs((d / "bundle.pem").read_bytes()),
    )
    return workload_pb2.X509SVIDResponse(svids=[svid])


class FakeWorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, socket_path: Path, first: workload_pb2.X509SVIDResponse) -> None:
        self.socket_path = socket_path
        self._cond = threading.Condition()
        self._current = first
        self._version = 1
        self._stopping = False
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix:{socket_path}")

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    def start(self) -> FakeWorkloadApi:
        self._server.start()
        return self

    def rotate(self, resp: workload_pb2.X509SVIDResponse) -> None:
        with self._cond:
            self._current = resp
            self._version += 1
            self._cond.notify_all()

    def FetchX509SVID(self, request: object, context: grpc.ServicerContext
                      ) -> Iterator[workload_pb2.X509SVIDResponse]:
        seen = 0
        while context.is_active():
            with self._cond:
                if self._stopping:
                    return
                if seen == self._version:
                    self._cond.wait(timeout=0.2)
                    continue
                seen, resp = self._version, self._current
            yield resp

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._server.stop(grace=0.5).wait()
