"""OpenTelemetry SDK setup for the ``cachescope`` command (the library itself needs only the API).

``configure_tracing`` builds a ``TracerProvider`` that exports in the background through a
``BatchSpanProcessor`` (bounded queue, short export timeout), so a collector that is down, slow or
hanging never blocks decoding: at worst spans are dropped. Standard ``OTEL_*`` environment
variables keep their meaning (the SDK reads them itself):

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (+ ``_HEADERS``,
  ``_TIMEOUT``, ``_COMPRESSION``, ``_CERTIFICATE``): where and how OTLP/HTTP exports go;
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: the sampler (wins over ``sample_ratio``);
* ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``: the resource (default service name
  ``cachescope``);
* ``OTEL_BSP_*``: batch processor queue size, delay, batch size, export timeout;
* ``OTEL_TRACES_EXPORTER``: ``none`` disables tracing, ``console`` adds the console exporter,
  ``otlp`` exports to the environment's OTLP endpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Sequence
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter, SpanExporter,
                                            SpanExportResult)

__all__ = ["configure_tracing", "shutdown", "GuardedExporter", "EXPORT_TIMEOUT_S"]

log = logging.getLogger("cachescope")

#: Timeout of one OTLP export request (all retries included) unless OTEL_*_TIMEOUT says otherwise.
EXPORT_TIMEOUT_S = 2.0
#: Time ``shutdown`` waits for the last spans to flush.
SHUTDOWN_TIMEOUT_S = 3.0


class GuardedExporter(SpanExporter):
    """Wraps an exporter: its exceptions become ``FAILURE`` results, logged once, then counted."""

    def __init__(self, exporter: SpanExporter, name: str | None = None) -> None:
        self.exporter = exporter
        self.name = name or type(exporter).__name__
        self.failures = 0
        self._lock = threading.Lock()

    def _failed(self, what: str) -> None:
        with self._lock:
            self.failures += 1
            first = self.failures == 1
        if first:
            log.warning("cachescope: span exporter %s failed in %s; spans are dropped, decoding "
                        "continues and further failures are not logged", self.name, what,
                        exc_info=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self.exporter.export(spans)
        except Exception:
            self._failed("export")
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        try:
            self.exporter.shutdown()
        except Exception:
            self._failed("shutdown")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return bool(self.exporter.force_flush(timeout_millis))
        except Exception:
            self._failed("force_flush")
            return False


def _traces_url(endpoint: str) -> str:
    """``http://host:4318`` -> ``http://host:4318/v1/traces``; a URL with a path is kept as is."""
    parts = urlsplit(endpoint)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"OTLP endpoint {endpoint!r} is not a URL: use e.g. http://localhost:4318")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"OTLP endpoint {endpoint!r}: cachescope exports OTLP over HTTP "
                         "(http:// or https://, port 4318 by default), not gRPC")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def _env_timeout_set() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT"))


def configure_tracing(otlp_endpoint: str | None = None, console: bool = False,
                      sample_ratio: float = 1.0, *,
                      export_timeout_s: float = EXPORT_TIMEOUT_S) -> TracerProvider | None:
    """A ``TracerProvider`` exporting to ``otlp_endpoint`` (OTLP/HTTP) and/or the console.

    ``otlp_endpoint`` is a base URL (``http://localhost:4318``; ``/v1/traces`` is added when the
    URL has no path) or a full traces URL. Without it, ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is
    used when set. Returns None when nothing would be exported (no endpoint, no console, or
    ``OTEL_TRACES_EXPORTER=none``): leave tracing off then. The provider is not made global; pass
    it to ``InstrumentedCache(tracer_provider=...)`` and call ``shutdown(provider)`` at exit.
    """
    if not 0.0 <= float(sample_ratio) <= 1.0:
        raise ValueError(f"sample_ratio must be in [0, 1], got {sample_ratio!r}")
    env_exporters = {e.strip().lower() for e in
                     os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in env_exporters:
        return None
    console = console or "console" in env_exporters
    env_endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    use_otlp = bool(otlp_endpoint) or bool(env_endpoint) or "otlp" in env_exporters
    if not use_otlp and not console:
        return None

    if os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = None  # the SDK reads OTEL_TRACES_SAMPLER / _ARG itself
    elif sample_ratio < 1.0:
        sampler = sampling.ParentBased(sampling.TraceIdRatioBased(float(sample_ratio)))
    else:
        sampler = sampling.ParentBased(sampling.ALWAYS_ON)
    attrs: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs[SERVICE_NAME] = "cachescope"
    provider = TracerProvider(sampler=sampler, resource=Resource.create(attrs),
                              shutdown_on_exit=False)
    bsp_timeout = None if os.environ.get("OTEL_BSP_EXPORT_TIMEOUT") else export_timeout_s * 1000
    if use_otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(
            endpoint=_traces_url(otlp_endpoint) if otlp_endpoint else None,
            timeout=None if _env_timeout_set() else export_timeout_s)
        provider.add_span_processor(BatchSpanProcessor(GuardedExporter(exporter, "otlp"),
                                                       export_timeout_millis=bsp_timeout))
    if console:
        provider.add_span_processor(BatchSpanProcessor(
            GuardedExporter(ConsoleSpanExporter(out=sys.stderr), "console"),
            export_timeout_millis=bsp_timeout))
    return provider


def shutdown(provider: Any, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Flush and shut ``provider`` down, waiting at most about ``timeout_s`` seconds.

    Returns True when it finished in time; otherwise the shutdown goes on in a daemon thread
    (spans still queued may be lost) and False is returned. ``None`` is accepted and ignored.
    """
    if provider is None:
        return True

    def run() -> None:
        try:
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                flush(int(timeout_s * 1000))
            provider.shutdown()
        except Exception:
            log.warning("cachescope: tracing shutdown failed", exc_info=True)

    t = threading.Thread(target=run, name="cachescope-otel-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning("cachescope: tracing did not shut down within %.1fs; unexported spans may be "
                    "lost", timeout_s)
        return False
    return True
