#!/usr/bin/env python3
"""
The backends of the tail-latency benchmark (bench/tail_latency.py): N HTTP/1 listeners in ONE Twisted process.

Every request is answered after a delay drawn from a lognormal distribution (median --median-ms, 99th
percentile --p99-ms), from a fixed-seed generator per listener, so a run is repeatable. Responses are
HTTP/1.1 keep-alive with a small body; C{x-backend: INDEX} names the listener that answered.

The fault is on the backend's own schedule: listener --fault-backend adds --fault-delay seconds to every request
that ARRIVES while the wall clock is in [--fault-start, --fault-end) (Unix times, so the load generator and this
process agree without talking). Without --fault-start there is no fault.

Pipelined requests are handled (each is delayed from its own arrival; responses leave in order). Request bodies
(Content-Length or chunked) are read and ignored.

    python bench/_tail_backend.py --ports 8001,8002,8003 --ready-file /tmp/ready

Standard library + Twisted only. Binds 127.0.0.1 only.
"""

import argparse
import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections import deque

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

LOCALHOST = "127.0.0.1"
MAX_HEAD = 65536
MAX_PENDING = 1024  # pipelined requests held per connection before we stop reading
Z99 = 2.3263478740408408  # standard normal 99th percentile


class Latency:
    """Per-listener lognormal delays (seconds), capped at C{cap}."""

    def __init__(self, median_s, p99_s, seed, cap_s):
        if not 0 < median_s < p99_s:
            raise ValueError("need 0 < median < p99")
        self.mu = math.log(median_s)
        self.sigma = math.log(p99_s / median_s) / Z99
        self.rng = random.Random(seed)
        self.cap = cap_s

    def draw(self):
        return min(self.cap, self.rng.lognormvariate(self.mu, self.sigma))


class Fault:
    def __init__(self, backend, start, end, delay):
        self.backend, self.start, self.end, self.delay = backend, start, end, delay

    def extra(self, index, wall):
        if self.start is None or index != self.backend:
            return 0.0
        if self.start <= wall < self.end:
            return self.delay
        return 0.0


class Stats:
    def __init__(self, n):
        self.requests = [0] * n
        self.faulted = [0] * n
        self.connections = [0] * n
        self.lateness = []  # seconds each response left after its intended time (timer + CPU lateness)


class BackendProtocol(Protocol):
    """Minimal HTTP/1.1 server: parse heads, delay, answer in order, keep-alive."""

    def __init__(self, index, latency, fault, stats, body):
        self.index = index
        self.latency = latency
        self.fault = fault
        self.stats = stats
        self.body = body
        self.buf = b""
        self.body_left = 0  # bytes of a Content-Length body still to skip
        self.chunked = False  # skipping a chunked body
        self.pending = deque()  # (ready_monotonic, keep_alive)
        self.timer = None
        self.closing = False
        self.paused = False

    def connectionMade(self):
        self.stats.connections[self.index] += 1
        sock = self.transport.getHandle()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def dataReceived(self, data):
        self.buf += data
        self._parse()

    def _parse(self):
        while not self.closing:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                self.buf = self.buf[take:]
                self.body_left -= take
                if self.body_left:
                    return
                continue
            if self.chunked:
                if not self._skip_chunked():
                    return
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._bad()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            self._request(head)
            if len(self.pending) >= MAX_PENDING and not self.paused:
                self.paused = True
                self.transport.pauseProducing()
                return

    def _skip_chunked(self):
        # Returns True when the whole chunked body (and its trailers) has been consumed.
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return False
            try:
                size = int(self.buf[:line_end].split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._bad()
                return False
            if size == 0:
                trailers_end = self.buf.find(b"\r\n\r\n", line_end)
                if self.buf[line_end:line_end + 4] == b"\r\n\r\n":
                    self.buf = self.buf[line_end + 4:]
                elif trailers_end >= 0:
                    self.buf = self.buf[trailers_end + 4:]
                else:
                    return False
                self.chunked = False
                return True
            need = line_end + 2 + size + 2
            if len(self.buf) < need:
                return False
            self.buf = self.buf[need:]

    def _request(self, head):
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._bad()
            return
        version = parts[2]
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                try:
                    self.body_left = int(value)
                except ValueError:
                    self._bad()
                    return
            elif name == b"transfer-encoding" and b"chunked" in value:
                self.chunked = True
            elif name == b"connection":
                if b"close" in value:
                    keep_alive = False
                elif b"keep-alive" in value:
                    keep_alive = True
        now = time.monotonic()
        extra = self.fault.extra(self.index, time.time())
        self.stats.requests[self.index] += 1
        if extra:
            self.stats.faulted[self.index] += 1
        self.pending.append((now + self.latency.draw() + extra, keep_alive))
        if self.timer is None:
            self._arm()

    def _arm(self):
        if not self.pending:
            self.timer = None
            return
        ready = self.pending[0][0]
        self.timer = reactor.callLater(max(0.0, ready - time.monotonic()), self._respond)

    def _respond(self):
        self.timer = None
        now = time.monotonic()
        out = []
        close = False
        while self.pending and self.pending[0][0] <= now + 0.0005:
            ready, keep_alive = self.pending.popleft()
            if len(self.stats.lateness) < 1000000:
                self.stats.lateness.append(max(0.0, now - ready))
            out.append(self._response(keep_alive))
            if not keep_alive:
                close = True
                self.pending.clear()
                break
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.closing = True
            self.transport.loseConnection()
            return
        if self.paused and len(self.pending) < MAX_PENDING // 2:
            self.paused = False
            self.transport.resumeProducing()
            self._parse()
        self._arm()

    def _response(self, keep_alive):
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nx-backend: %d\r\n%s\r\n%s"
                % (len(self.body), self.index, b"" if keep_alive else b"Connection: close\r\n", self.body))

    def _bad(self):
        self.closing = True
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.pending.clear()


class BackendFactory(Factory):
    def __init__(self, index, latency, fault, stats, body):
        self.index, self.latency, self.fault, self.stats, self.body = index, latency, fault, stats, body

    def buildProtocol(self, addr):
        return BackendProtocol(self.index, self.latency, self.fault, self.stats, self.body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--ports", required=True, help="comma-separated ports, one listener each, on 127.0.0.1")
    ap.add_argument("--median-ms", type=float, default=10.0, help="median delay (default %(default)s ms)")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="99th percentile delay (default %(default)s ms)")
    ap.add_argument("--cap-ms", type=float, default=1000.0, help="largest drawn delay (default %(default)s ms)")
    ap.add_argument("--seed", type=int, default=1, help="seed; listener i uses seed*1000+i (default 1)")
    ap.add_argument("--body-bytes", type=int, default=64, help="response body size (default %(default)s)")
    ap.add_argument("--fault-backend", type=int, default=0, help="index of the listener that turns slow")
    ap.add_argument("--fault-start", type=float, default=None, help="Unix time the fault starts (none: no fault)")
    ap.add_argument("--fault-end", type=float, default=None, help="Unix time the fault ends")
    ap.add_argument("--fault-delay", type=float, default=1.0, help="seconds added per request during the fault")
    ap.add_argument("--ready-file", help="write this file (JSON with the ports) once every listener is bound")
    ap.add_argument("--stats-file", help="write per-listener request counts here on exit")
    ap.add_argument("--max-lifetime", type=float, default=3600.0,
                    help="exit after this many seconds whatever happens (default %(default)s)")
    args = ap.parse_args(argv)

    ports = [int(p) for p in args.ports.split(",") if p.strip()]
    if args.fault_start is not None and args.fault_end is None:
        ap.error("--fault-start needs --fault-end")
    if args.fault_start is not None and not 0 <= args.fault_backend < len(ports):
        ap.error("--fault-backend is not a listener index")
    fault = Fault(args.fault_backend, args.fault_start, args.fault_end, args.fault_delay)
    stats = Stats(len(ports))
    body = (b"tail-latency backend\n" + b"x" * args.body_bytes)[:args.body_bytes]
    for i, port in enumerate(ports):
        latency = Latency(args.median_ms / 1e3, args.p99_ms / 1e3, args.seed * 1000 + i, args.cap_ms / 1e3)
        reactor.listenTCP(port, BackendFactory(i, latency, fault, stats, body), backlog=1024, interface=LOCALHOST)

    def write_stats():
        if args.stats_file:
            late = sorted(stats.lateness)

            def pct(p):
                return round(late[min(len(late) - 1, max(0, math.ceil(round(p / 100 * len(late), 6)) - 1))] * 1e3, 3)

            lateness = {"p50": pct(50), "p99": pct(99), "max": round(late[-1] * 1e3, 3)} if late else {}
            with open(args.stats_file, "w") as f:
                json.dump({"ports": ports, "requests": stats.requests, "faulted": stats.faulted,
                           "connections": stats.connections, "lateness_ms": lateness}, f)

    def stop(*_):
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.callLater(args.max_lifetime, reactor.stop)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"ports": ports, "pid": os.getpid()}, f)
        os.replace(tmp, args.ready_file)
    reactor.run(installSignalHandlers=False)
    write_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
