"""
Tests for L{linkproxy.admin.app} and L{linkproxy.admin.loglevel}, over the real Klein resource with StubTreq.
"""

import json

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import FilteringLogObserver, ILogFilterPredicate, Logger, LogLevel, PredicateResult
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from klein import Klein

from linkproxy.admin.app import PUBLIC, AdminApp, AdminKlein, is_local_client, is_loopback
from linkproxy.admin.loglevel import LogLevelControl
from linkproxy.admin.metrics import Metrics

BASE = "http://admin.invalid"


class _FromClient(Resource):
    """
    Serve a resource as if every request came from C{address}.

    StubTreq hard-codes its client as C{127.0.0.1:31337}; this swaps the peer the request reports before the
    real resource renders, which is all the loopback check looks at.
    """

    isLeaf = True

    def __init__(self, wrapped, address):
        super().__init__()
        self._wrapped = wrapped
        self._address = address

    def render(self, request):
        request.client = self._address
        return self._wrapped.render(request)


class _Harness:
    """
    An L{AdminApp} with recording collaborators, and a StubTreq over its resource.
    """

    def __init__(self, client=None):
        self.metrics = Metrics(process=False)
        self.pending = []
        self.config = {"outbound": "tcp:4140:interface=127.0.0.1", "identity": {"key": "<redacted>"}}
        self.log_level = LogLevelControl("info")
        self.shutdowns = 0
        self.clock = Clock()
        self.admin = AdminApp(
            metrics=self.metrics,
            readiness=lambda: list(self.pending),
            config_dump=lambda: self.config,
            log_level=self.log_level,
            shutdown=self._shutdown,
            reactor=self.clock,
        )
        resource = self.admin.app.resource()
        if client is not None:
            resource = _FromClient(resource, client)
        self.treq = StubTreq(resource)

    def _shutdown(self):
        self.shutdowns += 1


class AdminAppTests(SynchronousTestCase):
    """
    Every admin route, driven over HTTP through the real resource tree.
    """

    def setUp(self):
        self.h = _Harness()

    def request(self, method, path, treq=None, **kwargs):
        """
        Make a request and return C{(response, body bytes)}; StubTreq answers synchronously.
        """
        treq = treq or self.h.treq
        response = self.successResultOf(treq.request(method, BASE + path, **kwargs))
        body = self.successResultOf(response.content())
        return response, body

    def contentType(self, response):
        """
        The response's single C{Content-Type} value, as text.
        """
        return response.headers.getRawHeaders("content-type")[0]

    def test_live(self):
        """
        C{GET /live} answers 200 C{live} in plain text.
        """
        response, body = self.request("GET", "/live")
        self.assertEqual((response.code, body), (200, b"live\n"))
        self.assertTrue(self.contentType(response).startswith("text/plain"))

    def test_readyWhenNothingPending(self):
        """
        C{GET /ready} answers 200 C{ready} when the readiness callable reports nothing pending.
        """
        response, body = self.request("GET", "/ready")
        self.assertEqual((response.code, body), (200, b"ready\n"))

    def test_readyToggles(self):
        """
        C{GET /ready} answers 503 with one reason a line while things are pending, and 200 once they are not.
        """
        self.h.pending[:] = ["listener inbound not bound", "identity not loaded"]
        response, body = self.request("GET", "/ready")
        self.assertEqual(response.code, 503)
        self.assertEqual(body, b"listener inbound not bound\nidentity not loaded\n")
        self.assertTrue(self.contentType(response).startswith("text/plain"))

        self.h.pending[:] = ["identity not loaded"]
        self.assertEqual(self.request("GET", "/ready")[1], b"identity not loaded\n")

        self.h.pending[:] = []
        response, body = self.request("GET", "/ready")
        self.assertEqual((response.code, body), (200, b"ready\n"))

    def test_readyWhenCheckRaises(self):
        """
        A readiness callable that raises makes C{/ready} answer 503 rather than 200 or a traceback, and the
        failure is logged.
        """
        def broken():
            raise RuntimeError("boom")

        admin = AdminApp(metrics=self.h.metrics, readiness=broken, config_dump=dict,
                         log_level=self.h.log_level, shutdown=lambda: None, reactor=Clock())
        response, body = self.request("GET", "/ready", treq=StubTreq(admin.app.resource()))
        self.assertEqual((response.code, body), (503, b"readiness check failed\n"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_metrics(self):
        """
        C{GET /metrics} renders the injected registry in Prometheus text format, including a counter the data
        path incremented.
        """
        self.h.metrics.tcp("inbound", "src", "true", "127.0.0.1:8080").opened()
        response, body = self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.contentType(response), CONTENT_TYPE_LATEST)
        self.assertIn(
            b'tcp_open_total{direction="inbound",peer="src",target_addr="127.0.0.1:8080",tls="true"} 1.0',
            body)
        self.assertIn(b"# TYPE request_total counter", body)

    def test_envJson(self):
        """
        C{GET /env.json} answers the config dump as JSON, and reads it afresh on each request.
        """
        response, body = self.request("GET", "/env.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.contentType(response), "application/json")
        self.assertEqual(json.loads(body), self.h.config)

        self.h.config = {"changed": True}
        self.assertEqual(json.loads(self.request("GET", "/env.json")[1]), {"changed": True})

    def test_getLogLevel(self):
        """
        C{GET /proxy-log-level} answers the current level name.
        """
        response, body = self.request("GET", "/proxy-log-level")
        self.assertEqual((response.code, body), (200, b"info\n"))

    def test_putLogLevel(self):
        """
        C{PUT /proxy-log-level} with a level name, in any case and with surrounding whitespace, answers 204 and
        changes the level that C{GET} then reports.
        """
        response, body = self.request("PUT", "/proxy-log-level", data=b"  DEBUG\n")
        self.assertEqual((response.code, body), (204, b""))
        self.assertEqual(self.h.log_level.level, LogLevel.debug)
        self.assertEqual(self.request("GET", "/proxy-log-level")[1], b"debug\n")

    def test_putLogLevelWarningAlias(self):
        """
        C{warning} is accepted as C{warn}.
        """
        response, _ = self.request("PUT", "/proxy-log-level", data=b"warning")
        self.assertEqual(response.code, 204)
        self.assertEqual(self.request("GET", "/proxy-log-level")[1], b"warn\n")

    def test_putLogLevelInvalid(self):
        """
        C{PUT /proxy-log-level} with an unknown name answers 400 listing the valid levels, and leaves the level
        unchanged.
        """
        response, body = self.request("PUT", "/proxy-log-level", data=b"verbose")
        self.assertEqual(response.code, 400)
        self.assertTrue(self.contentType(response).startswith("text/plain"))
        self.assertIn(b"'verbose'", body)
        self.assertIn(b"debug, info, warn, error, critical", body)
        self.assertEqual(self.h.log_level.name, "info")

    def test_putLogLevelTooLong(self):
        """
        An oversized body is refused with 400 without being echoed back.
        """
        response, body = self.request("PUT", "/proxy-log-level", data=b"x" * 10000)
        self.assertEqual(response.code, 400)
        self.assertNotIn(b"xxxx", body)
        self.assertIn(b"debug, info, warn, error, critical", body)

    def test_shutdownAfterResponseOnce(self):
        """
        C{POST /shutdown} from loopback answers 202, and calls C{shutdown} only on a later reactor turn, after
        the response was delivered; repeated requests also get 202 but never a second call.
        """
        response, body = self.request("POST", "/shutdown")
        self.assertEqual((response.code, body), (202, b"shutdown\n"))
        self.assertEqual(self.h.shutdowns, 0)

        self.h.clock.advance(0)
        self.assertEqual(self.h.shutdowns, 1)

        response, body = self.request("POST", "/shutdown")
        self.assertEqual((response.code, body), (202, b"shutdown\n"))
        self.h.clock.advance(0)
        self.assertEqual(self.h.shutdowns, 1)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_shutdownRefusedFromElsewhere(self):
        """
        C{POST /shutdown} from a non-loopback client answers 403 with a message and never calls C{shutdown}.
        """
        h = _Harness(client=IPv4Address("TCP", "10.1.2.3", 40000))
        response, body = self.request("POST", "/shutdown", treq=h.treq)
        self.assertEqual(response.code, 403)
        self.assertIn(b"localhost", body)
        h.clock.advance(0)
        self.assertEqual(h.shutdowns, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_shutdownFromIPv6LoopbackAndUnixSocket(self):
        """
        C{::1}, an IPv4-mapped loopback, and a UNIX-socket client are all local, so shutdown is accepted.
        """
        for client in [IPv6Address("TCP", "::1", 40000), IPv6Address("TCP", "::ffff:127.0.0.1", 40000),
                       UNIXAddress(None)]:
            h = _Harness(client=client)
            response, _ = self.request("POST", "/shutdown", treq=h.treq)
            self.assertEqual(response.code, 202, client)
            h.clock.advance(0)
            self.assertEqual(h.shutdowns, 1, client)

    def test_shutdownGetNotAllowed(self):
        """
        C{GET /shutdown} answers 405 with C{Allow: POST}, and does not shut down.
        """
        response, body = self.request("GET", "/shutdown")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])
        self.assertTrue(self.contentType(response).startswith("text/plain"))
        self.h.clock.advance(0)
        self.assertEqual(self.h.shutdowns, 0)

    def test_notFound(self):
        """
        An unknown path answers a plain-text 404.
        """
        response, body = self.request("GET", "/nope")
        self.assertEqual((response.code, body), (404, b"not found\n"))
        self.assertTrue(self.contentType(response).startswith("text/plain"))


REMOTE = IPv4Address("TCP", "10.1.2.3", 40000)


class _PrivateRoutes:
    """
    Routes like the C{/tap} and C{/dashboard} that are added to the admin app, on the same L{AdminKlein}: they
    are private without saying so.
    """

    app = AdminKlein()

    @app.route("/tap", methods=["GET"])
    def tap(self, request):
        return b"events"

    @app.route("/dashboard", branch=True, methods=["GET"])
    def dashboard(self, request):
        return b"page"

    @app.route("/live", methods=["GET"])
    def live(self, request):
        return b"live"


class AdminSafetyTests(SynchronousTestCase):
    """
    With the admin listener on the pod IP, only the probe and scrape routes answer other hosts.
    """

    def request(self, treq, method, path, **kwargs):
        response = self.successResultOf(treq.request(method, BASE + path, **kwargs))
        return response.code, self.successResultOf(response.content())

    def test_publicRoutesAnswerEveryone(self):
        """
        C{/live}, C{/ready}, C{/metrics}, the redacted C{/env.json} and reading the log level answer a client
        on another host.
        """
        h = _Harness(client=REMOTE)
        for path in ["/live", "/ready", "/metrics", "/env.json", "/proxy-log-level"]:
            code, body = self.request(h.treq, "GET", path)
            self.assertEqual(code, 200, path)
        code, body = self.request(h.treq, "GET", "/env.json")
        self.assertEqual(json.loads(body)["identity"], {"key": "<redacted>"})
        self.assertEqual(self.request(h.treq, "HEAD", "/live")[0], 200)

    def test_privateRoutesRefuseOthers(self):
        """
        C{PUT /proxy-log-level}, C{POST /shutdown} and C{GET /tap} from another host answer 403, and change
        nothing; the refusal is logged once per route however often it is tried, within a minute.
        """
        logged = []
        h = _Harness(client=REMOTE)
        h.admin.log = Logger(namespace="linkproxy.admin", observer=logged.append)
        for _ in range(3):
            code, body = self.request(h.treq, "PUT", "/proxy-log-level", data=b"debug")
            self.assertEqual((code, body), (403, b"/proxy-log-level is only answered for clients on this host "
                                                 b"(localhost)\n"))
            code, body = self.request(h.treq, "POST", "/shutdown")
            self.assertEqual(code, 403)
            code, body = self.request(h.treq, "GET", "/tap?limit=1")
            self.assertEqual((code, body), (403, b"/tap is only answered for clients on this host (localhost)\n"))
        self.assertEqual(h.log_level.name, "info")
        h.clock.advance(0)
        self.assertEqual(h.shutdowns, 0)
        self.assertEqual([e["log_format"].format(**e) for e in logged],
                         ["refused PUT /proxy-log-level from non-local client 10.1.2.3",
                          "refused POST /shutdown from non-local client 10.1.2.3",
                          "refused GET /tap from non-local client 10.1.2.3"])
        self.assertEqual({e["log_level"] for e in logged}, {LogLevel.warn})
        h.clock.advance(60)
        self.request(h.treq, "POST", "/shutdown")
        self.assertEqual(len(logged), 4)

    def test_privateRoutesAnswerLocalClients(self):
        """
        The same routes answer loopback (IPv4, IPv6, mapped) and UNIX-socket clients.
        """
        for client in [IPv4Address("TCP", "127.0.0.2", 1), IPv6Address("TCP", "::1", 1), UNIXAddress(None)]:
            h = _Harness(client=client)
            self.assertEqual(self.request(h.treq, "PUT", "/proxy-log-level", data=b"debug")[0], 204, client)
            self.assertEqual(h.log_level.name, "debug")

    def test_newRoutesArePrivate(self):
        """
        A route added to an L{AdminKlein} app (here C{/tap} and C{/dashboard}, with a page below it) is refused
        to other hosts without marking it, unless it is one of the public pairs; local clients get it.
        """
        remote = StubTreq(_FromClient(_PrivateRoutes().app.resource(), REMOTE))
        local = StubTreq(_PrivateRoutes().app.resource())
        for path in ["/tap", "/dashboard", "/dashboard/app.js"]:
            self.assertEqual(self.request(remote, "GET", path)[0], 403, path)
            self.assertEqual(self.request(local, "GET", path)[0], 200, path)
        self.assertEqual(self.request(remote, "GET", "/live"), (200, b"live"))
        self.assertEqual(self.request(remote, "GET", "/tap?authority=x")[0], 403)

    def test_unknownPathsStill404(self):
        """
        Paths with no route, and wrong methods, answer 404 and 405 as before, to anyone.
        """
        h = _Harness(client=REMOTE)
        self.assertEqual(self.request(h.treq, "GET", "/nope")[0], 404)
        self.assertEqual(self.request(h.treq, "GET", "/shutdown")[0], 405)

    def test_publicTable(self):
        """
        The public table is exactly the probe, scrape, config and level-reading routes, for GET and HEAD.
        """
        self.assertEqual(PUBLIC, {(m, p) for m in (b"GET", b"HEAD") for p in (
            b"/live", b"/ready", b"/metrics", b"/env.json", b"/proxy-log-level")})
        self.assertIsInstance(AdminApp.app, Klein)
        self.assertIsInstance(AdminApp.app, AdminKlein)


class IsLoopbackTests(SynchronousTestCase):
    """
    L{is_loopback} and L{is_local_client} decide who may use privileged admin routes.
    """

    def test_loopback(self):
        """
        All of 127.0.0.0/8, C{::1} and IPv4-mapped loopback are loopback.
        """
        for host in ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1", "::ffff:127.1.2.3"]:
            self.assertTrue(is_loopback(host), host)

    def test_notLoopback(self):
        """
        Other addresses, mapped or not, and text that is no IP address are not loopback.
        """
        for host in ["10.0.0.1", "0.0.0.0", "::", "::ffff:10.0.0.1", "fe80::1", "128.0.0.1", "localhost", "",
                     "127.0.0.1.evil"]:
            self.assertFalse(is_loopback(host), host)

    def test_localClient(self):
        """
        L{is_local_client} accepts loopback IP addresses and UNIX sockets, and refuses other peers.
        """
        self.assertTrue(is_local_client(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertTrue(is_local_client(UNIXAddress(b"/run/admin.sock")))
        self.assertFalse(is_local_client(IPv4Address("TCP", "192.168.1.1", 1)))
        self.assertFalse(is_local_client(object()))


class LogLevelControlTests(SynchronousTestCase):
    """
    L{LogLevelControl} holds the runtime level and filters linkproxy's events by it.
    """

    def setUp(self):
        self.events = []
        self.control = LogLevelControl("warn")
        self.observer = self.control.observer(self.events.append)

    def emit(self, namespace, level):
        """
        Send one event through the filtering observer the way a L{Logger} would.
        """
        Logger(namespace=namespace, observer=self.observer).emit(level, "{ns} {lvl}", ns=namespace,
                                                                  lvl=level.name)

    def seen(self):
        """
        The (namespace, level) pairs the downstream observer received.
        """
        return [(e["log_namespace"], e["log_level"]) for e in self.events]

    def test_nameAndSet(self):
        """
        C{name} reports the canonical name; C{set} accepts any case, whitespace and the C{warning} alias.
        """
        self.assertEqual(self.control.name, "warn")
        self.control.set(" Error ")
        self.assertEqual((self.control.name, self.control.level), ("error", LogLevel.error))
        self.control.set("WARNING")
        self.assertEqual(self.control.name, "warn")

    def test_setInvalid(self):
        """
        C{set} with an unknown name raises L{ValueError} listing the valid names, and keeps the old level.
        """
        e = self.assertRaises(ValueError, self.control.set, "loud")
        self.assertIn("'loud'", str(e))
        self.assertIn("debug, info, warn, error, critical", str(e))
        self.assertEqual(self.control.name, "warn")

    def test_invalidInitial(self):
        """
        The constructor rejects an unknown initial level.
        """
        self.assertRaises(ValueError, LogLevelControl, "chatty")

    def test_observerType(self):
        """
        C{observer} returns a L{FilteringLogObserver}, and C{predicate} provides L{ILogFilterPredicate}.
        """
        self.assertIsInstance(self.observer, FilteringLogObserver)
        self.assertTrue(verifyObject(ILogFilterPredicate, self.control.predicate))

    def test_filtersLinkproxyNamespaces(self):
        """
        Events from C{linkproxy} and its sub-namespaces below the level are dropped; at or above it they pass.
        """
        self.emit("linkproxy", LogLevel.info)
        self.emit("linkproxy.net.splice", LogLevel.debug)
        self.emit("linkproxy.outbound", LogLevel.warn)
        self.emit("linkproxy", LogLevel.critical)
        self.assertEqual(self.seen(), [("linkproxy.outbound", LogLevel.warn), ("linkproxy", LogLevel.critical)])

    def test_passesOtherNamespaces(self):
        """
        Events from other namespaces, including ones that merely share the C{linkproxy} prefix, pass whatever
        their level, as do linkproxy events lacking a level.
        """
        self.emit("twisted.web.server", LogLevel.debug)
        self.emit("linkproxyish", LogLevel.debug)
        self.observer({"log_namespace": "linkproxy.core"})
        self.observer({"log_level": LogLevel.debug})
        self.assertEqual(len(self.events), 4)
        self.assertEqual([e.get("log_namespace") for e in self.events],
                         ["twisted.web.server", "linkproxyish", "linkproxy.core", None])

    def test_setAppliesImmediately(self):
        """
        A level changed after the observer was built applies to the very next event.
        """
        self.emit("linkproxy.inbound", LogLevel.debug)
        self.control.set("debug")
        self.emit("linkproxy.inbound", LogLevel.debug)
        self.assertEqual(self.seen(), [("linkproxy.inbound", LogLevel.debug)])

    def test_predicateResults(self):
        """
        The predicate says C{no} for filtered events and C{maybe}, never C{yes}, otherwise, so predicates
        combined with it still decide.
        """
        p = self.control.predicate
        self.assertIs(p({"log_namespace": "linkproxy", "log_level": LogLevel.info}), PredicateResult.no)
        self.assertIs(p({"log_namespace": "linkproxy", "log_level": LogLevel.error}), PredicateResult.maybe)
        self.assertIs(p({"log_namespace": "other", "log_level": LogLevel.debug}), PredicateResult.maybe)

    def test_adminPutChangesFiltering(self):
        """
        End to end: a C{PUT /proxy-log-level} changes what an observer wrapped by the same control lets through.
        """
        h = _Harness()
        observer = h.log_level.observer(self.events.append)
        log = Logger(namespace="linkproxy.outbound", observer=observer)
        log.debug("hidden")
        response = self.successResultOf(h.treq.put(BASE + "/proxy-log-level", data=b"debug"))
        self.assertEqual(response.code, 204)
        log.debug("shown")
        self.assertEqual([e["log_format"] for e in self.events], ["shown"])
