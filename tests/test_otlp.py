"""Tests for OTLP/HTTP export set up by cachescope._sdk (local receivers on 127.0.0.1 only)."""

from __future__ import annotations

import gzip
import http.server
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

from cachescope import InstrumentedCache
from cachescope import _attributes as A
from cachescope._cache import Cache
from cachescope._sdk import configure_tracing, shutdown

from _loop import NEW_TOKENS, run_decode
from _prom import free_port


class _Receiver:
    """A tiny OTLP/HTTP traces receiver: decodes each ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        self.got = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver.requests.append(req)
                receiver.paths.append(self.path)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                receiver.got.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans
                for s in ss.spans]

    def resources(self) -> list[dict]:
        return [{kv.key: kv.value.string_value for kv in rs.resource.attributes}
                for r in self.requests for rs in r.resource_spans]


@contextmanager
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


@contextmanager
def hanging_endpoint() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP port that accepts connections and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        s.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = s.accept()
                conns.append(c)  # hold it open, read nothing, answer nothing
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield s.getsockname()[1], conns
    finally:
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        s.close()


@pytest.fixture(autouse=True)
def _clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_TRACES_EXPORTER",
                "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_BSP_EXPORT_TIMEOUT",
                "OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"):
        monkeypatch.delenv(var, raising=False)


def test_otlp_export_reaches_a_local_receiver() -> None:
    """Spans from a real decode arrive at an OTLP/HTTP receiver as generate + decode_step spans."""
    with receiver() as r:
        provider = configure_tracing(otlp_endpoint=f"http://127.0.0.1:{r.port}")
        assert provider is not None
        cache = InstrumentedCache(name="otlp", metrics=False, tracer_provider=provider)
        assert run_decode(cache) == run_decode(Cache())
        assert shutdown(provider, timeout_s=10)
    assert set(r.paths) == {"/v1/traces"}
    spans = r.spans()
    names = sorted(s.name for s in spans)
    assert names == ["decode_step"] * NEW_TOKENS + ["generate"]
    gen = next(s for s in spans if s.name == "generate")
    steps = [s for s in spans if s.name == "decode_step"]
    assert all(s.parent_span_id == gen.span_id and s.trace_id == gen.trace_id for s in steps)
    events = [e for s in steps for e in s.events]
    assert {e.name for e in events} >= {"push", "pop"}
    attrs = {kv.key for e in events for kv in e.attributes}
    assert {A.QUEUE, A.FAMILY, A.DEPTH, A.BYTES_LOGICAL} <= attrs
    assert {"service.name": "cachescope"}.items() <= r.resources()[0].items()


def test_otlp_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME are honoured when no endpoint is passed."""
    with receiver() as r:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{r.port}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "decoder-7")
        provider = configure_tracing()
        assert provider is not None
        run_decode(InstrumentedCache(name="env", metrics=False, tracer_provider=provider), new_tokens=1)
        assert shutdown(provider, timeout_s=10)
    assert sorted(s.name for s in r.spans()) == ["decode_step", "generate"]
    assert r.resources()[0]["service.name"] == "decoder-7"


def test_sampler_environment_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_TRACES_SAMPLER=always_off drops every span even with sample_ratio=1."""
    with receiver() as r:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
        provider = configure_tracing(otlp_endpoint=f"http://127.0.0.1:{r.port}", sample_ratio=1.0)
        cache = InstrumentedCache(name="off", metrics=False, tracer_provider=provider)
        run_decode(cache, new_tokens=2)
        assert cache.tracer.trace_id() is None
        assert shutdown(provider, timeout_s=10)
    assert r.spans() == []


def test_sample_ratio_zero_records_nothing() -> None:
    """sample_ratio=0 makes every span non-recording."""
    provider = configure_tracing(console=True, sample_ratio=0.0)
    cache = InstrumentedCache(name="ratio", metrics=False, tracer_provider=provider)
    cache.mark_step(None, 0)
    assert cache.tracer._event_span is None
    cache.end_step()
    assert shutdown(provider)
    with pytest.raises(ValueError):
        configure_tracing(console=True, sample_ratio=1.5)


def test_nothing_configured_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint and no console (or OTEL_TRACES_EXPORTER=none) means no provider; shutdown(None) is fine."""
    assert configure_tracing() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert configure_tracing(otlp_endpoint="http://127.0.0.1:4318") is None
    assert shutdown(None)
    with pytest.raises(ValueError, match="gRPC"):
        monkeypatch.delenv("OTEL_TRACES_EXPORTER")
        configure_tracing(otlp_endpoint="grpc://127.0.0.1:4317")


def test_hanging_endpoint_does_not_block_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A collector that accepts and never answers neither slows the decode loop nor blocks shutdown for long."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # export while decoding, not only at exit
    export_timeout = 5.0  # a blocked step would take at least this long
    with hanging_endpoint() as (port, conns):
        provider = configure_tracing(otlp_endpoint=f"http://127.0.0.1:{port}",
                                     export_timeout_s=export_timeout)
        cache = InstrumentedCache(name="hang", metrics=False, tracer_provider=provider)
        slowest = 0.0
        for _ in range(3):  # several generations, so spans queue up while an export hangs
            t0 = time.perf_counter()
            tokens = run_decode(cache, new_tokens=8)
            slowest = max(slowest, time.perf_counter() - t0)
            assert tokens == run_decode(Cache(), new_tokens=8)
            time.sleep(0.05)
        assert conns, "the exporter never connected: the test would prove nothing"
        t0 = time.perf_counter()
        finished = shutdown(provider, timeout_s=1.0)
        took = time.perf_counter() - t0
    assert slowest < export_timeout / 2, f"a generation took {slowest:.2f}s: the export blocked it"
    assert took < 2.5, (finished, took)


def test_unreachable_endpoint_is_harmless() -> None:
    """Exporting to a closed port loses the spans quietly and the decode gives the same tokens."""
    port = free_port()
    provider = configure_tracing(otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
                                 export_timeout_s=0.5)
    cache = InstrumentedCache(name="down", metrics=False, tracer_provider=provider)
    assert run_decode(cache) == run_decode(Cache())
    t0 = time.perf_counter()
    shutdown(provider, timeout_s=2)
    assert time.perf_counter() - t0 < 4
