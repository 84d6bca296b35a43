"""A real S3-compatible server for the tests (moto's server mode) and a fault-injecting HTTP proxy in front of it.

The proxy forwards every request unchanged, except that every `every`-th one gets either a 503 SlowDown (what a
throttled S3 answers) or a connection closed without an answer (a dropped connection), and a `burst` of the next
N requests all get SlowDown (throttling that outlasts the SDK's retries); it counts every request and what it
injected, so a test can check that faults really happened and were survived. With `delay` each request waits that
long before it is forwarded (an object store's per-request latency, without a server's CPU), and `busy_seconds`
adds up the time during which at least one request was outstanding. `denied` answers every request for a path
ending in one of its keys with that key's (HTTP status, S3 error code), e.g. (403, "AccessDenied") or
(400, "ExpiredToken"), as S3 answers a request its credentials may not make.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from dataclasses import dataclass, field

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request '
    b"rate.</Message><RequestId>camkd-proxy</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FaultCounter:
    every: int = 0  # 0: no faults
    burst: int = 0  # the next `burst` requests all get SlowDown
    armed: tuple[int, str, str] | None = (
        None  # (burst, method, path suffix): a burst at the first such request
    )
    delay: float = 0.0  # seconds each request waits before it is forwarded
    denied: dict[str, tuple[int, str]] = field(default_factory=dict)  # path suffix → (status, S3 error code)
    denials: int = 0
    requests: int = 0
    slow_down: int = 0
    dropped: int = 0
    bursts_started: int = 0
    busy_seconds: float = 0.0
    outstanding: int = 0
    busy_since: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> None:
        with self.lock:
            if self.outstanding == 0:
                self.busy_since = time.perf_counter()
            self.outstanding += 1

    def end(self) -> None:
        with self.lock:
            self.outstanding -= 1
            if self.outstanding == 0:
                self.busy_seconds += time.perf_counter() - self.busy_since

    def next_fault(self, method: str = "", path: str = "") -> str | tuple[int, str] | None:
        with self.lock:
            self.requests += 1
            if self.armed is not None and method == self.armed[1] and path.endswith(self.armed[2]):
                self.burst, self.armed = self.armed[0], None
                self.bursts_started += 1
            for suffix, answer in self.denied.items():
                if path.split("?", 1)[0].endswith(suffix):
                    self.denials += 1
                    return answer
            if self.burst > 0:
                self.burst -= 1
                self.slow_down += 1
                return "slow_down"
            if not self.every or self.requests % self.every:
                return None
            if (self.requests // self.every) % 2:
                self.slow_down += 1
                return "slow_down"
            self.dropped += 1
            return "drop"


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.counter = FaultCounter()
        counter, upstream = self.counter, upstream_port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:  # HTTP/1.1 chunked transfer coding (the AWS SDK streams uploads this way)
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _forward(self) -> None:
                counter.begin()
                try:
                    self._answer()
                finally:
                    counter.end()

            def _answer(self) -> None:
                body = self._body()
                if counter.delay:
                    time.sleep(counter.delay)
                fault = counter.next_fault(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(fault, tuple):
                    self._refuse(*fault)
                    return
                if fault == "slow_down":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP | {"content-length", "expect"}
                }
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # HEAD answers carry the object's length without a body
                length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _refuse(self, status: int, code: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code}</Message>'
                    "<RequestId>camkd-proxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class S3Server:
    """moto's S3 server on a free local port, one bucket, and a fault proxy in front of it."""

    def __init__(self, bucket: str = "camkd") -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.bucket = bucket
        self.proxy = FaultProxy(self.port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def env(self, through_proxy: bool = True) -> dict[str, str]:
        """The standard AWS variables a user sets for an S3-compatible endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.proxy.endpoint if through_proxy else self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> S3Server:
        self.moto.start()
        self.client().create_bucket(Bucket=self.bucket)
        self.proxy.start()
        return self

    def stop(self) -> None:
        self.proxy.stop()
        self.moto.stop()
