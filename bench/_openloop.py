#!/usr/bin/env python3
"""
Open-loop HTTP/1.1 load generator for bench/tail_latency.py (standard library + Twisted only).

Requests are sent at fixed, precomputed times (constant rate, or Poisson arrivals) whether or not earlier ones
have completed: a slow server does not slow the generator down, so its slowness shows in the numbers instead
of being hidden (no "coordinated omission"). Every latency is measured from the request's SCHEDULED send time
to the end of its response, so time spent waiting for a free connection, connecting, or sent late by a busy
generator all counts.

Connections: a pool of keep-alive connections per target, one request at a time on each (no pipelining). A
request takes an idle connection, else opens a new one, up to --max-conns in total; past that it waits in a
FIFO queue (its latency still runs from its scheduled time, and the JSON reports how many had to wait). A
reused connection that closes before any byte of the response arrives (a keep-alive race) is retried once on
a new connection, as HTTP clients do for idempotent requests; retries are counted.

Errors: a response status other than 2xx, a closed or refused connection, a malformed response, or no complete
response within --timeout seconds of the scheduled time (the connection is then closed). Failed requests keep
their latency (time to the failure) and are counted separately.

With several --target values, requests go round-robin over them (a client-side balancer: the direct baseline).

The result is JSON (--out): parameters, counters, the generator's own send lag and CPU time, and one row per
measured request: [scheduled offset s, latency s, status, error or "", backend index from x-backend or -1].

    python bench/_openloop.py --target 127.0.0.1:4140 --host web.default:80 --rate 200 --duration 20 --out r.json
"""

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from collections import deque

from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Protocol

MAX_HEAD = 65536


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Request:
    __slots__ = ("index", "sched", "deadline", "target", "measured", "done", "conn", "timer", "retried",
                 "sent", "status", "error", "backend", "end")

    def __init__(self, index, sched, deadline, target, measured):
        self.index = index
        self.sched = sched
        self.deadline = deadline
        self.target = target
        self.measured = measured
        self.done = False
        self.conn = None
        self.timer = None
        self.retried = False
        self.sent = None
        self.status = 0
        self.error = ""
        self.backend = -1
        self.end = None


class Conn(Protocol):
    """One keep-alive client connection; at most one request in flight."""

    def __init__(self, gen, target):
        self.gen = gen
        self.target = target
        self.req = None
        self.buf = b""
        self.connected_ok = False
        self.used = 0  # requests completed on this connection
        self.got_bytes = False
        self._reset_response()

    def _reset_response(self):
        self.state = "head"
        self.status = 0
        self.length = None
        self.chunked = False
        self.close_after = False
        self.backend = -1

    # -- Twisted callbacks

    def connectionMade(self):
        self.connected_ok = True
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.gen.conn_made(self)

    def dataReceived(self, data):
        if self.req is None:
            # Bytes nobody asked for: the connection is out of step; drop it.
            self.transport.abortConnection()
            return
        self.got_bytes = True
        self.buf += data
        self._parse()

    def connectionLost(self, reason):
        self.gen.conn_lost(self, reason)

    # -- requests

    def send(self, req):
        self.req = req
        req.conn = self
        self.got_bytes = False
        self.buf = b""
        self._reset_response()
        req.sent = time.monotonic()
        self.transport.write(self.gen.request_bytes[self.target])

    def _parse(self):
        while self.req is not None:
            if self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self._fail("bad_response")
                    return
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                if not self._head(head):
                    return
                continue
            if self.state == "length":
                if len(self.buf) < self.length:
                    return
                self.buf = self.buf[self.length:]
                self._complete()
                return
            if self.state == "chunked":
                done = self._chunks()
                if done is None:
                    return
                self._complete()
                return
            if self.state == "eof":
                self.buf = b""  # body runs until the server closes
                return

    def _head(self, head):
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            if not parts[0].startswith(b"HTTP/1."):
                raise ValueError
            status = int(parts[1])
        except (ValueError, IndexError):
            self._fail("bad_response")
            return False
        if 100 <= status < 200:
            return True  # interim response: the real one follows
        self.status = status
        keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    self._fail("bad_response")
                    return False
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"connection":
                v = value.lower()
                if b"close" in v:
                    keep_alive = False
                elif b"keep-alive" in v:
                    keep_alive = True
            elif name == b"x-backend":
                try:
                    self.backend = int(value)
                except ValueError:
                    pass
        self.close_after = not keep_alive
        if status in (204, 304):
            self._complete()
            return False
        if self.chunked:
            self.state = "chunked"
        elif self.length is not None:
            self.state = "length"
        else:
            self.state = "eof"
            self.close_after = True
        return True

    def _chunks(self):
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return None
            try:
                size = int(self.buf[:line_end].split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._fail("bad_response")
                return None
            if size == 0:
                if self.buf[line_end:line_end + 4] == b"\r\n\r\n":
                    self.buf = self.buf[line_end + 4:]
                    return True
                end = self.buf.find(b"\r\n\r\n", line_end)
                if end < 0:
                    return None
                self.buf = self.buf[end + 4:]
                return True
            need = line_end + 2 + size + 2
            if len(self.buf) < need:
                return None
            self.buf = self.buf[need:]

    def _complete(self):
        req, self.req = self.req, None
        self.used += 1
        req.backend = self.backend
        ok = 200 <= self.status < 300
        self.gen.finish(req, self.status, "" if ok else f"http_{self.status}")
        if self.close_after or self.buf:
            # Server said close, or sent more than one response: do not reuse.
            self.transport.loseConnection()
        else:
            self.gen.conn_idle(self)

    def _fail(self, error):
        req, self.req = self.req, None
        if req is not None:
            self.gen.finish(req, self.status, error)
        self.transport.abortConnection()


class ConnFactory(ClientFactory):
    """Opens one connection for one request (C{req}; C{None} once that request has finished elsewhere)."""

    def __init__(self, gen, target, req):
        self.gen = gen
        self.target = target
        self.req = req
        self.connector = None

    def buildProtocol(self, addr):
        conn = Conn(self.gen, self.target)
        conn.factory = self
        return conn

    def clientConnectionFailed(self, connector, reason):
        req, self.req = self.req, None
        self.gen.connect_failed(req, reason)


class Generator:
    def __init__(self, args):
        self.args = args
        self.targets = args.target
        self.request_bytes = {}
        for t in self.targets:
            host = args.host or t
            self.request_bytes[t] = (f"GET {args.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: linkproxy-openloop\r\n"
                                     f"Accept: */*\r\n\r\n").encode("latin-1")
        self.idle = {t: [] for t in self.targets}
        self.waiting = {t: deque() for t in self.targets}
        self.total_conns = 0  # connecting + open
        self.peak_conns = 0
        self.conns_opened = 0
        self.connecting = {}  # placeholder conn id -> (target, req)
        self.results = []
        self.counts = {"scheduled": 0, "completed": 0, "errors": 0, "timeouts": 0, "queued": 0, "retries": 0,
                       "connect_errors": 0}
        self.lag = []  # dispatch lag (s) of measured requests
        self.outstanding = 0
        self.next_index = 0
        self.rng = random.Random(args.seed)
        self.finished_scheduling = False
        self.stopping = False
        self.errors_by_kind = {}

    # -- schedule

    def start(self):
        a = self.args
        now_wall, now_mono = time.time(), time.monotonic()
        start_at = a.start_at if a.start_at is not None else now_wall + a.warmup + 0.2
        self.t0 = now_mono + (start_at - now_wall)  # measured window starts here
        self.t_begin = self.t0 - a.warmup
        if self.t_begin < now_mono:
            print(f"[openloop] warning: start is {now_mono - self.t_begin:.3f}s in the past; starting now",
                  file=sys.stderr)
            self.t_begin = now_mono
            self.t0 = max(self.t0, now_mono)
        self.t_end = self.t0 + a.duration
        self.next_time = self.t_begin
        self.cpu0 = None
        self.watchdog = reactor.callLater(self.t_end - now_mono + a.timeout + 30, self._watchdog)
        reactor.callLater(max(0.0, self.t_begin - time.monotonic()), self._tick)

    def _advance(self):
        if self.args.arrivals == "poisson":
            self.next_time += self.rng.expovariate(self.args.rate)
        else:
            self.next_time = self.t_begin + (self.next_index + 1) / self.args.rate
        self.next_index += 1

    def _tick(self):
        now = time.monotonic()
        if self.cpu0 is None and now >= self.t0:
            self.cpu0 = _cpu()
        while self.next_time <= now and self.next_time < self.t_end:
            sched = self.next_time
            measured = sched >= self.t0
            if measured and self.cpu0 is None:
                self.cpu0 = _cpu()
            target = self.targets[self.next_index % len(self.targets)]
            req = Request(self.next_index, sched, sched + self.args.timeout, target, measured)
            self._advance()
            if measured:
                self.counts["scheduled"] += 1
                self.lag.append(now - sched)
            self.outstanding += 1
            req.timer = reactor.callLater(max(0.0, req.deadline - now), self._timeout, req)
            self._dispatch(req)
        if self.next_time >= self.t_end:
            self.finished_scheduling = True
            self.cpu1 = _cpu()
            self._maybe_stop()
            return
        reactor.callLater(max(0.0, self.next_time - time.monotonic()), self._tick)

    # -- connections

    def _dispatch(self, req):
        t = req.target
        while self.idle[t]:
            conn = self.idle[t].pop()  # LIFO keeps a few connections hot
            if conn.transport is not None and conn.connected_ok:
                conn.send(req)
                return
        if self.total_conns < self.args.max_conns:
            self._open(req)
            return
        if req.measured:
            self.counts["queued"] += 1
        self.waiting[t].append(req)

    def _open(self, req):
        host, _, port = req.target.rpartition(":")
        self.total_conns += 1
        self.conns_opened += 1
        self.peak_conns = max(self.peak_conns, self.total_conns)
        factory = ConnFactory(self, req.target, req)
        req.conn = factory
        factory.connector = reactor.connectTCP(host, int(port), factory,
                                               timeout=max(0.1, req.deadline - time.monotonic()))

    def conn_made(self, conn):
        factory = conn.factory
        req, factory.req = factory.req, None
        if req is None or req.done:
            self.conn_idle(conn)
            return
        conn.send(req)

    def connect_failed(self, req, reason):
        self.total_conns -= 1
        if req is not None and not req.done:
            self.counts["connect_errors"] += req.measured
            self.finish(req, 0, "connect_failed")
        self._drain_waiting()

    def conn_idle(self, conn):
        t = conn.target
        while self.waiting[t]:
            req = self.waiting[t].popleft()
            if not req.done:
                conn.send(req)
                return
        self.idle[t].append(conn)
        if self.finished_scheduling and self.outstanding == 0:
            self._maybe_stop()

    def conn_lost(self, conn, reason):
        self.total_conns -= 1
        try:
            self.idle[conn.target].remove(conn)
        except ValueError:
            pass
        req, conn.req = conn.req, None
        if req is not None and not req.done:
            if conn.state == "eof" and conn.status:
                req.backend = conn.backend
                self.finish(req, conn.status, "" if 200 <= conn.status < 300 else f"http_{conn.status}")
            elif conn.used > 0 and not conn.got_bytes and not req.retried:
                # Keep-alive race: the server closed an idle connection as we reused it. Retry once.
                req.retried = True
                if req.measured:
                    self.counts["retries"] += 1
                req.conn = None
                self._dispatch(req)
            else:
                self.finish(req, conn.status, "conn_lost")
        self._drain_waiting()

    def _drain_waiting(self):
        for t in self.targets:
            while self.waiting[t] and self.total_conns < self.args.max_conns:
                req = self.waiting[t].popleft()
                if not req.done:
                    self._open(req)

    # -- completion

    def _timeout(self, req):
        req.timer = None
        if req.done:
            return
        conn = req.conn
        self.finish(req, 0, "timeout")
        if isinstance(conn, Conn):
            conn.req = None
            if conn.transport is not None:
                conn.transport.abortConnection()
        elif isinstance(conn, ConnFactory):  # still connecting
            conn.req = None
            connector = conn.connector
            if connector is not None and connector.state == "connecting":
                connector.stopConnecting()

    def finish(self, req, status, error):
        if req.done:
            return
        req.done = True
        req.end = time.monotonic()
        if req.timer is not None and req.timer.active():
            req.timer.cancel()
        req.timer = None
        self.outstanding -= 1
        if req.measured:
            self.counts["completed"] += 1
            if error:
                self.counts["errors"] += 1
                kind = error
                self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
                if error == "timeout":
                    self.counts["timeouts"] += 1
            self.results.append([round(req.sched - self.t0, 6), round(req.end - req.sched, 6), status, error,
                                 req.backend])
        if self.finished_scheduling and self.outstanding == 0:
            reactor.callLater(0, self._maybe_stop)

    def _maybe_stop(self):
        if self.outstanding == 0 and self.finished_scheduling and not self.stopping:
            self.stopping = True
            if self.watchdog.active():
                self.watchdog.cancel()
            reactor.stop()

    def _watchdog(self):
        print("[openloop] watchdog: requests still outstanding; stopping", file=sys.stderr)
        if not self.stopping:
            self.stopping = True
            reactor.stop()

    def report(self):
        lag = sorted(self.lag)

        def pct(p):
            if not lag:
                return None
            return lag[min(len(lag) - 1, max(0, math.ceil(round(p / 100 * len(lag), 6)) - 1))]

        a = self.args
        cpu = (getattr(self, "cpu1", _cpu()) - (self.cpu0 or 0.0))
        return {
            "params": {"targets": self.targets, "host": a.host, "path": a.path, "rate": a.rate,
                       "duration": a.duration, "warmup": a.warmup, "timeout": a.timeout,
                       "max_conns": a.max_conns, "arrivals": a.arrivals, "seed": a.seed},
            "counts": self.counts,
            "errors_by_kind": self.errors_by_kind,
            "unfinished": self.outstanding,
            "connections": {"opened": self.conns_opened, "peak": self.peak_conns},
            "send_lag_ms": {"p50": _ms(pct(50)), "p99": _ms(pct(99)), "max": _ms(lag[-1] if lag else None)},
            "generator_cpu_s": cpu,
            "generator_cpu_util": cpu / a.duration if a.duration else None,
            "columns": ["sched_s", "latency_s", "status", "error", "backend"],
            "rows": self.results,
        }


def _ms(v):
    return None if v is None else round(v * 1e3, 3)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--target", action="append", required=True, metavar="HOST:PORT",
                    help="where to connect (repeat for client-side round-robin)")
    ap.add_argument("--host", help="Host header (default: the target)")
    ap.add_argument("--path", default="/", help="request path (default /)")
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second (default %(default)s)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load first (default 2)")
    ap.add_argument("--start-at", type=float, default=None,
                    help="Unix time at which the measured window starts (warmup runs before it)")
    ap.add_argument("--timeout", type=float, default=5.0,
                    help="per-request timeout in seconds, from the scheduled time (default %(default)s)")
    ap.add_argument("--max-conns", type=int, default=256, help="connection bound, all targets (default %(default)s)")
    ap.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform",
                    help="constant spacing (default) or Poisson arrivals")
    ap.add_argument("--seed", type=int, default=1, help="seed for Poisson arrivals")
    ap.add_argument("--out", required=True, help="write the JSON result here")
    args = ap.parse_args(argv)
    for t in args.target:
        host, _, port = t.rpartition(":")
        if not host or not port.isdigit():
            ap.error(f"--target {t!r}: expected HOST:PORT")
    if args.rate <= 0 or args.duration <= 0 or args.timeout <= 0 or args.max_conns < 1:
        ap.error("--rate, --duration, --timeout and --max-conns must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.max_conns + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.max_conns + 64), hard))
    gen = Generator(args)
    reactor.callWhenRunning(gen.start)
    reactor.run()
    doc = gen.report()
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, args.out)
    c = doc["counts"]
    print(f"[openloop] scheduled {c['scheduled']} completed {c['completed']} errors {c['errors']} "
          f"(timeouts {c['timeouts']}) queued {c['queued']} retries {c['retries']} conns {doc['connections']} "
          f"lag p99 {doc['send_lag_ms']['p99']} ms cpu {doc['generator_cpu_util']:.1%}", file=sys.stderr)
    return 0 if doc["unfinished"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
