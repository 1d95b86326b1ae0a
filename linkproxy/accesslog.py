"""
The access log (C{--access-log apache|json}): one line per finished request, as Linkerd's
C{LINKERD2_PROXY_ACCESS_LOG} writes, to C{--access-log-file} or standard error.

It is a watcher of the tap layer (L{linkproxy.layers.tap}). The watcher only formats the line and queues it
(bounded); a writer thread does the writes, so a slow disk or a full pipe never blocks the reactor. Lines
that find the queue full are dropped and counted in C{access_log_dropped_total}.

    apache: 127.0.0.1 - web.ns.serviceaccount.identity.local [04/Dec/2026:18:43:40 +0000] "GET /x HTTP/1.1" 200 335 web.test:80 5.2ms
    json:   {"timestamp": "...", "client_addr": ..., "client_id": ..., "method": ..., "authority": ..., ...}
"""

import json
import queue
import sys
import threading
import time

FORMATS = ("apache", "json")

#: Lines queued for the writer before new ones are dropped.
MAX_QUEUED = 10000

_JSON_FIELDS = ("direction", "client_addr", "client_id", "method", "authority", "path", "version", "status",
                "grpc_status", "request_bytes", "response_bytes", "duration_ms", "latency_ms", "endpoint", "tls",
                "route", "error")


def format_apache(event):
    """
    The Common Log Format line of a tap event, with the authority and duration after it.
    """
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(event["timestamp"]))
    version = event.get("version") or "1.1"
    return (f'{event["client_addr"] or "-"} - {event["client_id"] or "-"} [{stamp}] '
            f'"{event["method"]} {event["path"]} HTTP/{version}" {event["status"]} {event["response_bytes"]} '
            f'{event["authority"] or "-"} {event["duration_ms"]:g}ms')


def format_json(event):
    """
    One compact JSON object for a tap event, with an ISO 8601 UTC timestamp.
    """
    record = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event["timestamp"]))
              + ".%06dZ" % int((event["timestamp"] % 1) * 1e6)}
    for name in _JSON_FIELDS:
        record[name] = event.get(name)
    return json.dumps(record, separators=(",", ":"))


class AccessLog:
    """
    A tap watcher writing one line per final event through a writer thread.

    @ivar dropped: lines dropped because the queue was full.
    """

    def __init__(self, fmt, stream, max_queued=MAX_QUEUED, metrics=None, owns_stream=False):
        """
        @param fmt: C{"apache"} or C{"json"}.
        @param stream: a text file object to write to (line-buffered writes are flushed by the thread).
        @param owns_stream: close C{stream} in L{close} (a file the access log opened).
        @param metrics: a L{linkproxy.admin.metrics.Metrics} to count drops in, or C{None}.
        """
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self._format = format_apache if fmt == "apache" else format_json
        self._stream = stream
        self._owns_stream = owns_stream
        self._queue = queue.Queue(max_queued)
        self.dropped = 0
        self._dropped_counter = None
        if metrics is not None:
            from prometheus_client import Counter
            self._dropped_counter = Counter("access_log_dropped_total", "Access-log lines dropped because the "
                                            "writer fell behind", registry=metrics.registry)
        self._thread = threading.Thread(target=self._run, name="linkproxy-access-log", daemon=True)
        self._thread.start()

    def __call__(self, event):
        if event.get("final") is False:
            # A retried attempt: the request's line comes when it finishes.
            return
        try:
            self._queue.put_nowait(self._format(event))
        except queue.Full:
            self.dropped += 1
            if self._dropped_counter is not None:
                self._dropped_counter.inc()

    def _run(self):
        stream = self._stream
        get = self._queue.get
        while True:
            line = get()
            if line is None:
                break
            lines = [line]
            # Whatever else is queued goes in the same write.
            while True:
                try:
                    line = self._queue.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    self._write(stream, lines)
                    return
                lines.append(line)
            self._write(stream, lines)

    @staticmethod
    def _write(stream, lines):
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self, timeout=2.0):
        """
        Write what is queued, then stop the thread and close the file (at shutdown).
        """
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
        if self._owns_stream and not self._thread.is_alive():
            self._stream.close()


def open_access_log(fmt, path, metrics=None):
    """
    The L{AccessLog} for C{--access-log FMT} and C{--access-log-file PATH} (C{None}: standard error).
    """
    if path:
        return AccessLog(fmt, open(path, "a", encoding="utf-8", buffering=1), metrics=metrics, owns_stream=True)
    return AccessLog(fmt, sys.stderr, metrics=metrics)
