"""
Tests for L{linkproxy.discovery}: the registry, C{static:}, C{file:} (watched, with a L{Clock} and real temp
files), C{dns} (against a real L{twisted.names} server on 127.0.0.1) and the shared L{ResolutionCache}.
"""

import os

from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, globalLogPublisher
from twisted.names import common, dns, error
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from linkproxy.admin.metrics import Metrics
from linkproxy.config import Config
from linkproxy.core.endpoint import Endpoint
from linkproxy.discovery import (
    build_discovery,
    find_discovery,
    normalize_target,
    spec_name,
    split_target,
)
from linkproxy.discovery.cache import ResolutionCache
from linkproxy.discovery.dns import DnsDiscovery
from linkproxy.discovery.file import EndpointsFileError, FileDiscovery, parse_endpoints
from linkproxy.discovery.static import StaticDiscovery, parse_static_spec
from linkproxy.interfaces import IDiscovery, IResolution, IResolutionReceiver
from linkproxy.testing import FakeDiscovery


@implementer(IResolutionReceiver)
class Receiver:
    """
    Records every update, and fires waiters on the next one.

    @ivar sets: every C{reset} set, as a list of addresses, in order.
    """

    def __init__(self):
        self.sets = []
        self.endpoint_sets = []
        self._waiting = []

    def reset(self, endpoints):
        endpoints = tuple(endpoints)
        self.endpoint_sets.append(endpoints)
        self.sets.append([e.address for e in endpoints])
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.sets[-1])

    def add(self, endpoints):
        raise AssertionError("backends here only reset")

    def remove(self, addresses):
        raise AssertionError("backends here only reset")

    def next(self):
        """
        @return: a L{Deferred} firing with the next set.
        """
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    @property
    def last(self):
        return self.sets[-1] if self.sets else None


def errors(metrics, backend):
    return metrics.registry.get_sample_value("discovery_errors_total", {"backend": backend}) or 0.0


class RegistryTests(unittest.TestCase):
    """
    L{build_discovery}, L{find_discovery} and the target helpers.
    """

    def test_specName(self):
        """
        The backend name is the text before the first colon.
        """
        self.assertEqual(spec_name("file:/a:b"), "file")
        self.assertEqual(spec_name("dns"), "dns")

    def test_findBuiltins(self):
        """
        Built-in names are found by name; unknown ones raise L{KeyError} listing the available backends.
        """
        for spec in ["dns", "dns:127.0.0.1:53", "file:/x", "static:a:1=127.0.0.1:2"]:
            self.assertEqual(find_discovery(spec), spec_name(spec))
        with self.assertRaises(KeyError) as raised:
            find_discovery("nonesuch")
        self.assertIn("available: dns, file, static", raised.exception.args[0])

    def test_buildBuiltins(self):
        """
        Each built-in spec builds the matching backend, which provides L{IDiscovery}.
        """
        clock = Clock()
        config = Config(discovery="static:web:80=127.0.0.1:8081", static_endpoints=(("web:80", ("127.0.0.1", 8081)),))
        static = build_discovery(config.discovery, config, clock)
        self.assertIsInstance(static, StaticDiscovery)
        self.assertEqual(static.targets, ["web:80"])
        self.assertIsInstance(build_discovery("file:/nonexistent", None, clock), FileDiscovery)
        dns_discovery = build_discovery("dns", None, clock)
        self.assertIsInstance(dns_discovery, DnsDiscovery)
        self.assertIsInstance(build_discovery("dns:127.0.0.1:5353", None, clock), DnsDiscovery)
        for discovery in [static, dns_discovery]:
            self.assertTrue(verifyObject(IDiscovery, discovery))

    def test_buildStaticWithoutConfig(self):
        """
        Without a config, C{static:} entries are read from the spec itself.
        """
        discovery = build_discovery("static:Web:80=127.0.0.1:1,web:80=127.0.0.1:2", None, Clock())
        receiver = Receiver()
        discovery.resolve("web:80", receiver)
        self.assertEqual(receiver.last, [("127.0.0.1", 1), ("127.0.0.1", 2)])

    def test_buildErrors(self):
        """
        A DNS server must be an IP address, and unknown backends raise L{KeyError}.
        """
        self.assertRaises(ValueError, build_discovery, "dns:dns.example:53", None, Clock())
        self.assertRaises(ValueError, build_discovery, "dns:127.0.0.1:99999", None, Clock())
        self.assertRaises(KeyError, build_discovery, "nonesuch", None, Clock())

    def test_normalizeTarget(self):
        """
        Targets compare with a lower-case host, no trailing dot, and IPv6 in brackets; port 0 is for SRV.
        """
        self.assertEqual(normalize_target("Web.Default.:80"), "web.default:80")
        self.assertEqual(normalize_target("[::1]:80"), "[::1]:80")
        self.assertEqual(split_target("_http._tcp.web:0"), ("_http._tcp.web", 0))
        for bad in ["web", "web:", ":80", "web:x", "we b:80"]:
            self.assertRaises(ValueError, normalize_target, bad)


class StaticTests(unittest.TestCase):
    """
    C{static:} discovery.
    """

    def test_fixedSets(self):
        """
        A configured target gets its endpoints synchronously, matched ignoring case; an unknown one gets an
        empty set.
        """
        discovery = StaticDiscovery([("web:80", ("127.0.0.1", 8081)), ("WEB:80", ("127.0.0.1", 8082)),
                                     ("db:5432", ("::1", 5432))])
        receiver = Receiver()
        resolution = discovery.resolve("Web:80", receiver)
        self.assertTrue(verifyObject(IResolution, resolution))
        self.assertEqual(receiver.sets, [[("127.0.0.1", 8081), ("127.0.0.1", 8082)]])
        other = Receiver()
        discovery.resolve("nothing:80", other)
        self.assertEqual(other.sets, [[]])
        resolution.cancel()

    def test_parseSpec(self):
        """
        The spec body is C{NAME=ADDR,...}; every bad entry is named.
        """
        self.assertEqual(parse_static_spec("a:1=127.0.0.1:2"), (("a:1", ("127.0.0.1", 2)),))
        with self.assertRaises(ValueError) as raised:
            parse_static_spec("a:1=x, b=127.0.0.1:1, c")
        message = str(raised.exception)
        self.assertIn("'a:1=x'", message)
        self.assertIn("'b=127.0.0.1:1'", message)
        self.assertIn("'c'", message)


GOOD = b"""\
services:
  web.default.svc.cluster.local:80:
    - addr: 127.0.0.1:8081
      identity: web.default.serviceaccount.identity.linkproxy.local
      proxy: 127.0.0.1:4143
      weight: 2
      labels: {pod: web-0}
      protocol: http1
    - addr: 127.0.0.1:8082
  Empty:81: []
"""


class ParseEndpointsTests(unittest.TestCase):
    """
    L{parse_endpoints}: the endpoints file format.
    """

    def test_full(self):
        """
        Every field of the format is read; target names are normalised.
        """
        sets = parse_endpoints(GOOD)
        self.assertEqual(sorted(sets), ["empty:81", "web.default.svc.cluster.local:80"])
        first, second = sets["web.default.svc.cluster.local:80"]
        self.assertEqual(first, Endpoint(address=("127.0.0.1", 8081), weight=2.0,
                                         identity="web.default.serviceaccount.identity.linkproxy.local",
                                         proxy=("127.0.0.1", 4143), protocol="http1"))
        self.assertEqual(first.labels, {"pod": "web-0"})
        self.assertTrue(first.meshed)
        self.assertEqual(second, Endpoint(address=("127.0.0.1", 8082)))
        self.assertEqual(sets["empty:81"], ())

    def test_identityDefaultsProxy(self):
        """
        A meshed endpoint with no C{proxy} is reached through the inbound port beside it.
        """
        sets = parse_endpoints(b"services:\n  a:1:\n    - {addr: '10.0.0.1:80', identity: a.b}\n")
        self.assertEqual(sets["a:1"][0].proxy, ("10.0.0.1", 4143))

    def test_everyProblem(self):
        """
        Every problem in the file is listed, each naming where it is.
        """
        with self.assertRaises(EndpointsFileError) as raised:
            parse_endpoints(b"""\
services:
  web:80:
    - addr: nowhere
    - addr: 127.0.0.1:1
      weight: -1
      protocol: gopher
      colour: blue
  bad target: []
""")
        problems = raised.exception.problems
        self.assertEqual(len(problems), 5, problems)
        text = str(raised.exception)
        for part in ["service web:80 endpoint 1: addr", "weight must be a number >= 0", "protocol must be one of",
                     "unknown fields ['colour']", "service 'bad target'"]:
            self.assertIn(part, text)

    def test_notYaml(self):
        """
        Broken YAML is reported with its position; an empty file and a missing C{services} key are errors.
        """
        with self.assertRaises(EndpointsFileError) as raised:
            parse_endpoints(b"services:\n  a:1: [\n")
        self.assertIn("not valid YAML at line", str(raised.exception))
        self.assertRaises(EndpointsFileError, parse_endpoints, b"  \n")
        self.assertRaises(EndpointsFileError, parse_endpoints, b"endpoints: {}\n")
        self.assertEqual(parse_endpoints(b"services:\n"), {})


class FileDiscoveryTests(unittest.TestCase):
    """
    L{FileDiscovery} on a real temp file, polled by a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()
        self.metrics = Metrics(process=False)
        self.mtime = 1_000_000_000 * 10**9
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def write(self, data):
        """
        Write the file and move its mtime on, as an editor would (without waiting for the clock to tick).
        """
        with open(self.path, "wb") as f:
            f.write(data)
        self.mtime += 10**9
        os.utime(self.path, ns=(self.mtime, self.mtime))

    def discovery(self):
        return FileDiscovery(self.path, self.clock, metrics=self.metrics, log=Logger(namespace="test.file"))

    def test_liveEdit(self):
        """
        The current set is delivered at once; an edit is applied to every watcher on the next poll, and
        watchers of targets whose set did not change get nothing.
        """
        self.write(GOOD)
        discovery = self.discovery()
        web, other, empty = Receiver(), Receiver(), Receiver()
        discovery.resolve("WEB.default.svc.cluster.local:80", web)
        discovery.resolve("other:80", other)
        discovery.resolve("empty:81", empty)
        self.assertEqual(web.last, [("127.0.0.1", 8081), ("127.0.0.1", 8082)])
        self.assertEqual((other.sets, empty.sets), ([[]], [[]]))

        self.write(GOOD.replace(b"8082", b"8083") + b"  other:80:\n    - addr: 127.0.0.1:9\n")
        self.clock.advance(1.0)
        self.assertEqual(web.last, [("127.0.0.1", 8081), ("127.0.0.1", 8083)])
        self.assertEqual(other.last, [("127.0.0.1", 9)])
        self.assertEqual(len(empty.sets), 1)
        self.assertEqual(errors(self.metrics, "file"), 0)

    def test_labelOnlyEdit(self):
        """
        An edit that changes only labels is still delivered.
        """
        self.write(GOOD)
        discovery = self.discovery()
        web = Receiver()
        discovery.resolve("web.default.svc.cluster.local:80", web)
        self.write(GOOD.replace(b"web-0", b"web-9"))
        self.clock.advance(1.0)
        self.assertEqual(web.endpoint_sets[-1][0].labels, {"pod": "web-9"})

    def test_badEditKeepsLastGood(self):
        """
        A bad edit keeps the last good set, is logged (a warning) naming the problem and counted once however
        many polls see it; the next good edit applies.
        """
        self.write(GOOD)
        discovery = self.discovery()
        web = Receiver()
        discovery.resolve("web.default.svc.cluster.local:80", web)
        self.write(GOOD.replace(b"127.0.0.1:8082", b"127.0.0.1:http"))
        for _ in range(5):
            self.clock.advance(1.0)
        self.assertEqual(len(web.sets), 1)
        self.assertEqual(errors(self.metrics, "file"), 1)
        bad = [e for e in self.logged if e.get("log_namespace") == "test.file" and "unusable" in e["log_format"]]
        messages = [e["log_format"].format(**e) for e in bad]
        self.assertEqual(len(messages), 1)
        self.assertEqual(bad[0]["log_level"].name, "warn")
        self.assertIn("keeping the last good version", messages[0])
        self.assertIn("invalid port 'http'", messages[0])

        self.write(b"services:\n  web.default.svc.cluster.local:80:\n    - addr: 127.0.0.1:7\n")
        self.clock.advance(1.0)
        self.assertEqual(web.last, [("127.0.0.1", 7)])

    def test_truncatedAndMissing(self):
        """
        An empty (mid-write) or missing file is a bad edit too; the good content coming back is re-applied.
        """
        self.write(GOOD)
        discovery = self.discovery()
        web = Receiver()
        discovery.resolve("web.default.svc.cluster.local:80", web)
        self.write(b"")
        self.clock.advance(1.0)
        os.remove(self.path)
        self.clock.advance(1.0)
        self.assertEqual(len(web.sets), 1)
        self.assertEqual(errors(self.metrics, "file"), 2)
        self.write(GOOD.replace(b"8082", b"8084"))
        self.clock.advance(1.0)
        self.assertEqual(web.last, [("127.0.0.1", 8081), ("127.0.0.1", 8084)])

    def test_missingAtStart(self):
        """
        With no good file yet, targets have no endpoints; the file appearing later fills them in.
        """
        discovery = self.discovery()
        web = Receiver()
        discovery.resolve("web.default.svc.cluster.local:80", web)
        self.assertEqual(web.sets, [[]])
        self.assertEqual(errors(self.metrics, "file"), 1)
        self.write(GOOD)
        self.clock.advance(1.0)
        self.assertEqual(len(web.last), 2)

    def test_sameSignatureEditIsFound(self):
        """
        An edit that keeps the size and mtime is still found by the periodic content check.
        """
        self.write(GOOD)
        discovery = self.discovery()
        web = Receiver()
        discovery.resolve("web.default.svc.cluster.local:80", web)
        stat = os.stat(self.path)
        with open(self.path, "wb") as f:
            f.write(GOOD.replace(b"8082", b"8089"))
        os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        self.clock.advance(1.0)
        self.assertEqual(len(web.sets), 1)
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertEqual(web.last, [("127.0.0.1", 8081), ("127.0.0.1", 8089)])

    def test_pollsOnlyWhileWatched(self):
        """
        Polling starts with the first watch and stops when the last is cancelled.
        """
        self.write(GOOD)
        discovery = self.discovery()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        first = discovery.resolve("a:1", Receiver())
        second = discovery.resolve("b:1", Receiver())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        first.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        second.cancel()
        second.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MemoryResolver(common.ResolverBase):
    """
    An authority whose records a test changes: C{records[name]} is a list of C{RRHeader}; a name that is not
    there is NXDOMAIN, and one listed as C{"servfail"} fails the server.
    """

    def __init__(self):
        common.ResolverBase.__init__(self)
        self.records = {}
        self.additional = {}
        self.queries = []

    def _lookup(self, name, cls, type, timeout):
        name = name.decode("ascii") if isinstance(name, bytes) else name
        self.queries.append((name, type))
        records = self.records.get(name)
        if records is None:
            return defer.fail(error.DomainError(name))
        if records == "servfail":
            return defer.fail(RuntimeError("broken on purpose"))
        answers = [r for r in records if r.type == type]
        return defer.succeed((answers, [], self.additional.get(name, [])))


def a(name, ip, ttl=30):
    return dns.RRHeader(name.encode(), dns.A, ttl=ttl, payload=dns.Record_A(ip, ttl))


def aaaa(name, ip, ttl=30):
    return dns.RRHeader(name.encode(), dns.AAAA, ttl=ttl, payload=dns.Record_AAAA(ip, ttl))


def srv(name, target, port, priority=0, weight=0, ttl=30):
    return dns.RRHeader(name.encode(), dns.SRV, ttl=ttl,
                        payload=dns.Record_SRV(priority, weight, port, target.encode(), ttl))


class DnsDiscoveryTests(unittest.TestCase):
    """
    L{DnsDiscovery} against a real L{twisted.names} server on 127.0.0.1 (UDP), with refreshes on a L{Clock}.
    """

    timeout = 20

    def setUp(self):
        from twisted.internet import reactor
        from twisted.names import client, server

        self.reactor = reactor
        self.authority = MemoryResolver()
        factory = server.DNSServerFactory(authorities=[self.authority])
        self.port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.server = ("127.0.0.1", self.port.getHost().port)
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.resolver = client.Resolver(servers=[self.server], reactor=reactor)
        self.discovery = DnsDiscovery(self.clock, resolver=self.resolver, metrics=self.metrics,
                                      query_timeout=(2.0,))

    def watch(self, target, discovery=None):
        receiver = Receiver()
        first = receiver.next()
        resolution = (discovery or self.discovery).resolve(target, receiver)
        self.addCleanup(resolution.cancel)
        return receiver, first

    def refresh_delays(self):
        return sorted(round(call.getTime() - self.clock.seconds(), 3) for call in self.clock.getDelayedCalls())

    @defer.inlineCallbacks
    def test_addresses(self):
        """
        A and AAAA records become endpoints on the target's port; the refresh is due at the smallest TTL.
        """
        self.authority.records["web.test"] = [a("web.test", "127.0.0.2", ttl=20), a("web.test", "127.0.0.3"),
                                              aaaa("web.test", "::1", ttl=40)]
        receiver, first = self.watch("Web.Test:8080")
        endpoints = yield first
        self.assertEqual(endpoints, [("127.0.0.2", 8080), ("127.0.0.3", 8080), ("::1", 8080)])
        self.assertEqual(self.refresh_delays(), [20.0])

    @defer.inlineCallbacks
    def test_ipv4First(self):
        """
        With C{families="ipv4-first"}, AAAA records are used only for names without A records.
        """
        discovery = DnsDiscovery(self.clock, resolver=self.resolver, families="ipv4-first")
        self.authority.records["dual.test"] = [a("dual.test", "127.0.0.2"), aaaa("dual.test", "::1")]
        self.authority.records["v6.test"] = [aaaa("v6.test", "::1")]
        _, dual = self.watch("dual.test:80", discovery)
        _, v6 = self.watch("v6.test:80", discovery)
        self.assertEqual((yield dual), [("127.0.0.2", 80)])
        self.assertEqual((yield v6), [("::1", 80)])
        self.assertRaises(ValueError, DnsDiscovery, self.clock, families="ipv6")

    @defer.inlineCallbacks
    def test_specServer(self):
        """
        C{dns:IP:PORT} queries that server.
        """
        self.authority.records["web.test"] = [a("web.test", "127.0.0.9")]
        discovery = build_discovery(f"dns:{self.server[0]}:{self.server[1]}", None, self.reactor)
        receiver, first = self.watch("web.test:80", discovery)
        self.assertEqual((yield first), [("127.0.0.9", 80)])

    @defer.inlineCallbacks
    def test_ttlRefresh(self):
        """
        When the TTL runs out the name is looked up again and a change is delivered; an unchanged answer is
        not delivered again. TTLs are clamped to [min_ttl, max_ttl].
        """
        self.authority.records["web.test"] = [a("web.test", "127.0.0.2", ttl=1)]
        receiver, first = self.watch("web.test:80")
        yield first
        self.assertEqual(self.refresh_delays(), [5.0])

        self.authority.records["web.test"] = [a("web.test", "127.0.0.4", ttl=3600)]
        second = receiver.next()
        self.clock.advance(5.0)
        self.assertEqual((yield second), [("127.0.0.4", 80)])
        self.assertEqual(self.refresh_delays(), [60.0])

        queries = len(self.authority.queries)
        self.clock.advance(60.0)
        while len(self.clock.getDelayedCalls()) == 0:
            yield deferLater(self.reactor, 0.01)
        self.assertEqual(len(self.authority.queries), queries + 2)
        self.assertEqual(len(receiver.sets), 2)

    @defer.inlineCallbacks
    def test_nxdomain(self):
        """
        NXDOMAIN means no endpoints, and is no error.
        """
        receiver, first = self.watch("missing.test:80")
        self.assertEqual((yield first), [])
        self.assertEqual(errors(self.metrics, "dns"), 0)

    @defer.inlineCallbacks
    def test_srv(self):
        """
        An C{_}-prefixed host is looked up as SRV: the lowest priority's targets, with the records' ports and
        weights, addressed from glue records or from their own A/AAAA lookups.
        """
        name = "_http._tcp.web.test"
        self.authority.records[name] = [srv(name, "a.test", 8081, weight=3), srv(name, "b.test", 8082, weight=1),
                                        srv(name, "backup.test", 9999, priority=10)]
        self.authority.additional[name] = [a("a.test", "127.0.0.5")]
        self.authority.records["b.test"] = [aaaa("b.test", "::1")]
        self.authority.records["backup.test"] = [a("backup.test", "127.0.0.99")]
        receiver, first = self.watch(name + ":0")
        self.assertEqual((yield first), [("127.0.0.5", 8081), ("::1", 8082)])
        self.assertEqual([e.weight for e in receiver.endpoint_sets[-1]], [3.0, 1.0])
        looked_up = {q[0] for q in self.authority.queries}
        self.assertNotIn("a.test", looked_up)
        self.assertIn("b.test", looked_up)

    @defer.inlineCallbacks
    def test_errorKeepsLastSet(self):
        """
        A server failure keeps the last set, counts an error and retries with backoff; a later answer applies.
        """
        self.authority.records["web.test"] = [a("web.test", "127.0.0.2", ttl=5)]
        receiver, first = self.watch("web.test:80")
        yield first
        self.authority.records["web.test"] = "servfail"
        self.clock.advance(5.0)
        while errors(self.metrics, "dns") < 1:
            yield deferLater(self.reactor, 0.01)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(receiver.sets), 1)
        [delay] = self.refresh_delays()
        self.assertTrue(1.0 <= delay <= 1.5, delay)

        self.authority.records["web.test"] = [a("web.test", "127.0.0.3")]
        second = receiver.next()
        self.clock.advance(delay + 0.01)
        self.assertEqual((yield second), [("127.0.0.3", 80)])

    def test_ipLiteral(self):
        """
        IP-literal hosts resolve to themselves at once, without DNS.
        """
        discovery = DnsDiscovery(self.clock, resolver=object())
        receiver = Receiver()
        discovery.resolve("10.1.2.3:80", receiver)
        discovery.resolve("[::1]:81", receiver)
        self.assertEqual(receiver.sets, [[("10.1.2.3", 80)], [("::1", 81)]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_cancel(self):
        """
        A cancelled watch schedules nothing more and delivers nothing more.
        """
        self.authority.records["web.test"] = [a("web.test", "127.0.0.2")]
        receiver = Receiver()
        first = receiver.next()
        resolution = self.discovery.resolve("web.test:80", receiver)
        yield first
        resolution.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        in_flight = Receiver()
        self.discovery.resolve("web.test:80", in_flight).cancel()
        yield deferLater(self.reactor, 0.1)
        self.assertEqual(in_flight.sets, [])


def deferLater(reactor, delay):
    from twisted.internet.task import deferLater as later

    return later(reactor, delay, lambda: None)


class CacheTests(unittest.TestCase):
    """
    L{ResolutionCache}: one resolution per target, folded updates, idle eviction.
    """

    def setUp(self):
        self.clock = Clock()
        self.discovery = FakeDiscovery({"web:80": [("127.0.0.1", 1)]})
        self.metrics = Metrics(process=False)
        self.cache = ResolutionCache(self.discovery, self.clock, idle_timeout=60.0, metrics=self.metrics)

    def test_shared(self):
        """
        However many users watch a target, discovery resolves it once; subscribers get the current set at
        once and every later one.
        """
        first = self.cache.watch("web:80")
        second = self.cache.watch("WEB:80")
        self.assertIs(first, second)
        self.assertEqual(self.discovery.resolved, ["web:80"])
        self.assertEqual(first.endpoints, (Endpoint(address=("127.0.0.1", 1)),))
        one, two = Receiver(), Receiver()
        first.subscribe(one)
        subscription = second.subscribe(two)
        self.discovery.push("web:80", [("127.0.0.1", 2)])
        subscription.cancel()
        self.discovery.push("web:80", [("127.0.0.1", 3)])
        self.assertEqual(one.sets, [[("127.0.0.1", 1)], [("127.0.0.1", 2)], [("127.0.0.1", 3)]])
        self.assertEqual(two.sets, [[("127.0.0.1", 1)], [("127.0.0.1", 2)]])
        self.assertEqual(self.metrics.registry.get_sample_value(
            "discovery_updates_total", {"backend": "fake", "target": "web:80"}), 3)

    def test_pendingFirstUpdate(self):
        """
        Until discovery answers, C{endpoints} is C{None} and subscribers get nothing.
        """
        watch = self.cache.watch("db:5432")
        receiver = Receiver()
        watch.subscribe(receiver)
        self.assertIsNone(watch.endpoints)
        self.assertEqual(receiver.sets, [])
        self.discovery.push("db:5432", [])
        self.assertEqual(watch.endpoints, ())
        self.assertEqual(receiver.sets, [[]])

    def test_addRemoveFold(self):
        """
        A backend's C{add} and C{remove} reach subscribers as whole sets.
        """
        watch = self.cache.watch("web:80")
        receiver = Receiver()
        watch.subscribe(receiver)
        self.discovery.add("web:80", [("127.0.0.1", 2), Endpoint(address=("127.0.0.1", 1), weight=5)])
        self.discovery.remove("web:80", [("127.0.0.1", 2)])
        self.assertEqual(receiver.sets[1], [("127.0.0.1", 1), ("127.0.0.1", 2)])
        self.assertEqual(receiver.endpoint_sets[1][0].weight, 5)
        self.assertEqual(receiver.sets[2], [("127.0.0.1", 1)])

    def test_changesLoggedOnce(self):
        """
        Each change of a target's endpoint set is logged once at info, with the target, the count and how
        many endpoints were added, removed and changed; an update that changes nothing logs nothing.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        # The fake answers at once with 127.0.0.1:1; pushing that set again changes nothing.
        watch = self.cache.watch("web:80")
        self.discovery.push("web:80", [("127.0.0.1", 1)])
        self.discovery.push("web:80", [("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)])
        self.discovery.push("web:80", [("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)])
        self.discovery.push("web:80", [Endpoint(address=("127.0.0.1", 1), weight=2), ("127.0.0.1", 4)])
        self.assertEqual(watch.updates, 5)
        events = [e for e in logged if e.get("log_namespace") == "linkproxy.discovery.cache"]
        self.assertEqual([e["log_format"].format(**e) for e in events], [
            "web:80: discovered 1 endpoints (fake)",
            "web:80: 3 endpoints (2 added, 0 removed, 0 changed)",
            "web:80: 2 endpoints (1 added, 2 removed, 1 changed)",
        ])
        self.assertEqual([(e["target"], e["count"], e["added"], e["removed"]) for e in events[1:]],
                         [("web:80", 3, 2, 0), ("web:80", 2, 1, 2)])
        self.assertEqual({e["log_level"].name for e in events}, {"info"})

    def test_idleEviction(self):
        """
        A watch untouched for C{idle_timeout} is evicted: its resolution is cancelled and subscribers told;
        touching keeps it; a later watch resolves afresh.
        """
        watch = self.cache.watch("web:80")
        evicted = []
        watch.subscribe(Receiver(), evicted=lambda: evicted.append(True))
        for _ in range(10):
            self.clock.advance(30.0)
            watch.touch(self.clock.seconds())
        self.assertIn("web:80", self.cache)
        self.clock.advance(60.0 * 1.25)
        self.assertNotIn("web:80", self.cache)
        self.assertEqual((evicted, self.discovery.cancelled), ([True], ["web:80"]))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.discovery.push("web:80", [("127.0.0.1", 9)])
        self.assertIsNot(self.cache.watch("web:80"), watch)
        self.assertEqual(self.discovery.resolved, ["web:80", "web:80"])

    def test_maxTargets(self):
        """
        Past C{max_targets}, the least recently used watch is evicted to make room.
        """
        cache = ResolutionCache(self.discovery, self.clock, max_targets=2)
        cache.watch("a:1")
        cache.watch("b:1")
        cache.watch("a:1")
        cache.watch("c:1")
        self.assertEqual(cache.targets(), ["a:1", "c:1"])
        self.assertEqual(self.discovery.cancelled, ["b:1"])

    def test_brokenBackend(self):
        """
        A backend raising from C{resolve} leaves the target with no endpoints, and is logged.
        """
        class Broken:
            def resolve(self, target, receiver):
                raise RuntimeError("boom")

        cache = ResolutionCache(Broken(), self.clock)
        self.assertEqual(cache.watch("a:1").endpoints, ())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_close(self):
        """
        Closing evicts everything and stops the sweep.
        """
        self.cache.watch("web:80")
        self.cache.close()
        self.assertEqual((len(self.cache), self.discovery.cancelled), (0, ["web:80"]))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(ValueError, self.cache.watch, "web:80")
        self.assertIn(b"discovery_updates_total", generate_latest(self.metrics.registry))
