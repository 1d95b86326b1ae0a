"""
Tests for L{linkproxy.net.mesh}: mTLS and the transport header between two proxies, over real loopback
sockets on 127.0.0.1 with the real reactor, and the inbound authorization helpers.
"""

import os
import time

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from linkproxy.admin.metrics import Metrics
from linkproxy.core import transport_header
from linkproxy.core.endpoint import Endpoint
from linkproxy.core.errors import Forbidden
from linkproxy.core.transport_header import TransportHeader
from linkproxy.identity import ca
from linkproxy.identity.store import IdentityStore
from linkproxy.interfaces import IRouter
from linkproxy.net.connect import Connector
from linkproxy.net.context import PLAIN, PeerInfo
from linkproxy.net.authz import AuthorizingRouter, authz_metrics
from linkproxy.net.mesh import TRANSPORT_HEADER_ALPN, MeshConnector, MeshServer, tls_error_label
from linkproxy.net.sniff import SniffingProtocol
from linkproxy.net.tls import (
    IdentityNotReady,
    PeerIdentityMismatch,
    client_connection_creator,
    server_context_factory,
)
from linkproxy.net.tcp import opaque_proxy
from linkproxy.routing import FixedRouter
from linkproxy.runtime import Runtime

WEB = "web.default.serviceaccount.identity.linkproxy.local"
API = "api.default.serviceaccount.identity.linkproxy.local"
DB = "db.default.serviceaccount.identity.linkproxy.local"
DAY = 86400


def _srv(name, port, authz=False):
    """
    The srv_* (and, for allows, authz_*) labels of the authz counters under the default policy C{name}.
    """
    labels = dict(srv_group="", srv_kind="default", srv_name=name, srv_port=port)
    if authz:
        labels.update(authz_group="", authz_kind="default", authz_name=name)
    return labels


@implementer(IHalfCloseableProtocol)
class App(protocol.Protocol):
    """
    An application protocol on either end: records what it gets; optionally greets, echoes upper-cased,
    and answers the peer's EOF with C{<eof>}; closes on the peer's EOF.
    """

    def __init__(self, greeting=b"", echo=False, answer_eof=False):
        self.greeting = greeting
        self.echo = echo
        self.answer_eof = answer_eof
        self.made = False
        self.received = b""
        self.events = []
        self.lost = Deferred()
        self.reason = None
        self._waiting = []

    def connectionMade(self):
        """
        Note the connection and send the greeting.
        """
        self.made = True
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data):
        """
        Keep C{data}, echo it if asked, and wake waiters.
        """
        self.received += data
        if self.echo:
            self.transport.write(data.upper())
        self._wake()

    def readConnectionLost(self):
        """
        The peer finished sending: answer if asked, then close, as a TCP server usually does.
        """
        self.events.append("readConnectionLost")
        if self.answer_eof:
            self.transport.write(b"<eof>")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        """
        Record it.
        """
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason=None):
        """
        Record the reason and fire L{lost}.
        """
        self.reason = reason
        for expected, d in self._waiting:
            d.errback(AssertionError(f"lost before {expected!r}; got {self.received!r}"))
        self._waiting = []
        self.lost.callback(None)

    def wait_for(self, expected):
        """
        @return: a Deferred firing once exactly C{expected} has been received.
        """
        d = Deferred()
        self._waiting.append((expected, d))
        self._wake()
        return d

    def _wake(self):
        # Firing a waiter may run a test that adds the next one; work on a snapshot.
        waiting, self._waiting = self._waiting, []
        still = []
        for expected, d in waiting:
            if len(self.received) >= len(expected):
                if self.received[:len(expected)] == expected:
                    d.callback(self.received)
                else:
                    d.errback(AssertionError(f"expected {expected!r}, got {self.received!r}"))
            else:
                still.append((expected, d))
        self._waiting = still + self._waiting


class ObservedSniffer(SniffingProtocol):
    """
    The inbound proxy's first protocol, with a Deferred that fires when the connection is gone.
    """

    def connectionMade(self):
        """
        Register with the test's list of accepted connections.
        """
        self.gone = Deferred()
        self.factory.accepted.append(self)
        SniffingProtocol.connectionMade(self)

    def connectionLost(self, reason=None):
        """
        Pass on, then fire L{gone}.
        """
        SniffingProtocol.connectionLost(self, reason)
        self.gone.callback(None)


class MeshHelpers:
    """
    Trust domains, identity stores, an inbound listener (detect → terminate mTLS → app) and a connector.
    """

    timeout = 30

    def setUp(self):
        from twisted.internet import reactor
        self.reactor = reactor
        self.metrics = Metrics(process=False)
        self.client_metrics = Metrics(process=False)

    def trust_domain(self, now=None):
        """
        @return: a new identity directory holding an anchor and an issuer.
        """
        directory = self.mktemp()
        ca.init_trust_domain(directory, now=now)
        return directory

    def store(self, directory, name, at=None):
        """
        A started, self-issuing store on its own L{Clock} set to C{at} (default now).
        """
        clock = Clock()
        clock.advance(time.time() if at is None else at)
        store = IdentityStore(directory, name, reactor=clock)
        store.start()
        store.clock = clock
        self.addCleanup(store.stop)
        return store

    @defer.inlineCallbacks
    def listen(self, store, require_client_cert=True, header_timeout=5.0, handshake_timeout=5.0, app=None,
               any_sni=False, hand_to=None, alpn=None):
        """
        An inbound listener on 127.0.0.1: detection, then L{MeshServer} for our SNI, then an L{App}.

        @param any_sni: terminate TLS whatever the SNI (a misconfigured or impostor proxy).
        @param hand_to: C{(peer, header) -> IProtocol} to use instead of making an app protocol.
        @param app: makes the app protocol; default: an upper-casing echo answering EOF.
        @param alpn: the L{MeshServer}'s C{alpn}; C{()} stands in for a linkproxy from before ALPN.
        @return: the port, with C{accepted} (sniffers), C{ready} (C{(peer, header)} per hand-over), C{apps}
            and C{mesh}.
        """
        kwargs = {} if alpn is None else {"alpn": alpn}
        mesh = MeshServer(store, metrics=self.metrics, reactor=self.reactor,
                          require_client_cert=require_client_cert, header_timeout=header_timeout,
                          handshake_timeout=handshake_timeout, **kwargs)
        ready, apps, other = [], [], []
        make_app = app or (lambda: App(echo=True, answer_eof=True))

        def on_ready(peer, header):
            ready.append((peer, header))
            if hand_to is not None:
                return hand_to(peer, header)
            server_app = make_app()
            apps.append(server_app)
            return server_app

        def on_detected(detection, transport):
            if mesh.accepts(detection) or (any_sni and detection.protocol.value == "tls"):
                return mesh.protocol(on_ready)
            other.append(detection)
            return None

        factory = protocol.Factory()
        factory.accepted = []
        factory.buildProtocol = lambda addr: self._sniffer(factory, on_detected)
        port = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        port.accepted, port.ready, port.apps, port.other, port.mesh = factory.accepted, ready, apps, other, mesh
        return port

    def _sniffer(self, factory, on_detected):
        sniffer = ObservedSniffer(on_detected, reactor=self.reactor, timeout=5.0, metrics=self.metrics,
                                  direction="inbound")
        sniffer.factory = factory
        return sniffer

    def endpoint(self, port, identity=WEB, app_port=8080):
        """
        A meshed endpoint whose inbound proxy is C{port}.
        """
        return Endpoint(address=("127.0.0.1", app_port), identity=identity,
                        proxy=("127.0.0.1", port.getHost().port))

    def connector(self, store, timeout=5.0):
        """
        A L{MeshConnector} counting on the client's metrics.
        """
        return MeshConnector(store, self.reactor, timeout, metrics=self.client_metrics)

    def track(self, app):
        """
        Abort C{app}'s connection at cleanup if a failed test left it open, and wait for it to go.
        """
        def abort():
            if app.made and not app.lost.called:
                app.transport.abortConnection()
                return app.lost
        self.addCleanup(abort)
        return app

    @defer.inlineCallbacks
    def tls_client(self, port, creator, greeting):
        """
        Connect a TLS client that writes C{greeting} after the handshake (a header, if the test wants one).
        """
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port.getHost().port)
        app = self.track(App(greeting=greeting))
        yield connectProtocol(wrapClientTLS(creator, endpoint), app)
        return app

    @defer.inlineCallbacks
    def gone(self, port):
        """
        Wait until every connection the listener accepted is closed.
        """
        yield defer.gatherResults([s.gone for s in port.accepted])

    def errors(self, direction="inbound", protocol_="tls", metrics=None):
        """
        @return: C{{error: count}} from C{tcp_protocol_error_total} for a direction and protocol.
        """
        out = {}
        for family in (metrics or self.metrics).registry.collect():
            if family.name != "tcp_protocol_error":
                continue
            for sample in family.samples:
                labels = sample.labels
                if (sample.name.endswith("_total") and labels["direction"] == direction
                        and labels["protocol"] == protocol_):
                    out[labels["error"]] = sample.value
        return out

    @defer.inlineCallbacks
    def refused_client(self, port, store, name=WEB):
        """
        Connect with C{store}'s certificate and expect the server to refuse it after the client's side of
        the handshake (TLS 1.3 clients finish first): the app sees the connection die, with nothing from the
        server, and the server never hands over.
        """
        app = self.track(App(greeting=b"hello"))
        result = yield self.connector(store).connect(self.endpoint(port, name), app, None)
        self.assertIs(result, app)
        yield app.lost
        yield self.gone(port)
        self.assertEqual(app.received, b"")
        self.assertEqual(port.ready, [])
        return app


class OutboundToInboundTests(MeshHelpers, TestCase):
    """
    L{MeshConnector} on one side, detection and L{MeshServer} on the other.
    """

    @defer.inlineCallbacks
    def test_header_identity_and_data(self):
        """
        The server learns the target port and session protocol from the header and the client's verified
        identity from its certificate; the client's first bytes follow the header, and bytes flow both ways
        over TLS 1.3 with SNI set to the server's identity.
        """
        domain = self.trust_domain()
        server, client = self.store(domain, WEB), self.store(domain, API)
        port = yield self.listen(server)
        app = self.track(App(greeting=b"ping"))
        result = yield self.connector(client).connect(self.endpoint(port), app, "http1")
        self.assertIs(result, app)
        self.assertTrue(app.made)
        yield app.wait_for(b"PING")
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=API, server_id=WEB),
                                       TransportHeader(8080, "", "http1"))])
        self.assertEqual(port.apps[0].received, b"ping")
        handle = app.transport.getHandle()
        self.assertEqual(handle.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(handle.get_servername(), WEB.encode())
        app.transport.write(b"more")
        yield app.wait_for(b"PINGMORE")
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)
        self.assertEqual(self.errors(), {})

    @defer.inlineCallbacks
    def test_through_connector_http2_and_opaque(self):
        """
        Installed as L{Connector.meshed}, it carries C{http2} and opaque (no session protocol) in the header,
        with the endpoint's port.
        """
        domain = self.trust_domain()
        server, client = self.store(domain, WEB), self.store(domain, API)
        port = yield self.listen(server)
        connector = Connector(self.reactor, 5.0, meshed=self.connector(client).connect)
        first = self.track(App(greeting=b"a"))
        yield connector.connect(self.endpoint(port, app_port=9090), first, "http2")
        second = self.track(App(greeting=b"b"))
        yield connector.connect(self.endpoint(port, app_port=5432), second)
        yield first.wait_for(b"A")
        yield second.wait_for(b"B")
        headers = sorted((header for _, header in port.ready), key=lambda h: h.port)
        self.assertEqual(headers, [TransportHeader(5432, "", None), TransportHeader(9090, "", "http2")])
        first.transport.loseConnection()
        second.transport.loseConnection()
        yield defer.gatherResults([first.lost, second.lost])
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_half_close_both_ways(self):
        """
        A client's EOF crosses the mesh as a TLS close_notify and reaches the server app as
        C{readConnectionLost}; the server app can still answer before closing, and the client reads it all.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        app = self.track(App(greeting=b"request"))
        yield self.connector(self.store(domain, API)).connect(self.endpoint(port), app, None)
        yield app.wait_for(b"REQUEST")
        app.transport.loseWriteConnection()
        # Writes after the half-close are dropped, not sent as garbage or raised.
        app.transport.write(b"ignored")
        yield app.lost
        self.assertEqual(app.received, b"REQUEST<eof>")
        self.assertIn("readConnectionLost", app.events)
        yield self.gone(port)
        self.assertEqual(port.apps[0].received, b"request")
        self.assertEqual(port.apps[0].events, ["readConnectionLost"])
        self.assertEqual(self.errors(), {})

    @defer.inlineCallbacks
    def test_server_half_close(self):
        """
        The server app half-closes first; the client app gets C{readConnectionLost}, keeps sending, and the
        server app still receives what it sends.
        """
        domain = self.trust_domain()

        class Banner(App):
            """
            A server-speaks-first app that says its piece and half-closes.
            """

            def connectionMade(self):
                App.connectionMade(self)
                self.transport.write(b"banner")
                self.transport.loseWriteConnection()

        port = yield self.listen(self.store(domain, WEB), app=lambda: Banner())
        client_app = App(greeting=b"hi")

        def on_eof():
            client_app.transport.write(b" after eof")
            client_app.transport.loseConnection()

        client_app.readConnectionLost = lambda: (client_app.events.append("readConnectionLost"), on_eof())
        self.track(client_app)
        yield self.connector(self.store(domain, API)).connect(self.endpoint(port), client_app, None)
        yield client_app.lost
        yield self.gone(port)
        self.assertEqual(client_app.received, b"banner")
        self.assertEqual(client_app.events, ["readConnectionLost"])
        self.assertEqual(port.apps[0].received, b"hi after eof")

    @defer.inlineCallbacks
    def test_opaque_splice_to_app(self):
        """
        The inbound wiring the assembly uses for opaque traffic: the header's port picks the local app,
        L{opaque_proxy} splices the TLS stream to it, and a client half-close crosses both hops: the app sees
        EOF, and its answer still reaches the client.
        """
        backend_apps = []

        def backend_app():
            app = App(echo=True, answer_eof=True)
            backend_apps.append(app)
            return app

        backend = protocol.Factory()
        backend.buildProtocol = lambda addr: backend_app()
        app_port = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(backend)
        self.addCleanup(app_port.stopListening)
        runtime = Runtime(reactor=self.reactor, config=None, metrics=self.metrics, tracker=None,
                          connector=Connector(self.reactor, 5.0))

        def opaque(peer, header):
            target = Endpoint(address=("127.0.0.1", header.port))
            return opaque_proxy(runtime, FixedRouter(target), target.addr_str, "inbound",
                                self.metrics.tcp("inbound", "src", peer.tls, target.addr_str))

        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), hand_to=opaque)
        client = self.track(App(greeting=b"request"))
        endpoint = self.endpoint(port, app_port=app_port.getHost().port)
        yield self.connector(self.store(domain, API)).connect(endpoint, client, None)
        yield client.wait_for(b"REQUEST")
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertEqual(client.received, b"REQUEST<eof>")
        yield self.gone(port)
        yield backend_apps[0].lost
        self.assertEqual(backend_apps[0].received, b"request")
        self.assertEqual(backend_apps[0].events, ["readConnectionLost"])
        self.assertEqual(self.metrics.registry.get_sample_value(
            "tcp_read_bytes_total", {"direction": "inbound", "peer": "src", "tls": "true",
                                     "target_addr": endpoint.addr_str}), len(b"request"))

    @defer.inlineCallbacks
    def test_live_connection_survives_rotation(self):
        """
        After both stores renew their certificates, an open connection keeps working, and a new connection
        uses the new certificates.
        """
        start = time.time() - 0.7 * DAY
        domain = self.trust_domain(now=start - 3600)
        server, client = self.store(domain, WEB, at=start), self.store(domain, API, at=start)
        port = yield self.listen(server)
        connector = self.connector(client)
        old = self.track(App(greeting=b"one"))
        yield connector.connect(self.endpoint(port), old, None)
        yield old.wait_for(b"ONE")
        old_serial = old.transport.getHandle().get_peer_certificate(as_cryptography=True).serial_number

        server.clock.advance(0.7 * DAY)
        client.clock.advance(0.7 * DAY)
        self.assertEqual((server.current.generation, client.current.generation), (2, 2))

        new = self.track(App(greeting=b"two"))
        yield connector.connect(self.endpoint(port), new, None)
        yield new.wait_for(b"TWO")
        new_cert = new.transport.getHandle().get_peer_certificate(as_cryptography=True)
        self.assertEqual(new_cert, server.current.leaf)
        self.assertNotEqual(new_cert.serial_number, old_serial)
        self.assertEqual(port.ready[1][0].client_id, API)
        # The contexts of the new generation negotiate the ALPN too, so the header still comes.
        self.assertEqual(new.transport.negotiatedProtocol, TRANSPORT_HEADER_ALPN)
        self.assertEqual(port.ready[1][1], TransportHeader(8080, "", None))

        old.transport.write(b"still")
        yield old.wait_for(b"ONESTILL")
        for app in (old, new):
            app.transport.loseConnection()
        yield defer.gatherResults([old.lost, new.lost])
        yield self.gone(port)


class RefusalTests(MeshHelpers, TestCase):
    """
    Every way a meshed connection is refused, and how each is counted.
    """

    @defer.inlineCallbacks
    def test_wrong_server_identity(self):
        """
        A server whose (trusted) certificate names another identity than the one dialled (here a proxy that
        answers any SNI) fails the connect Deferred with L{PeerIdentityMismatch}; the caller's protocol is
        never connected, and both sides count it.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), any_sni=True)
        app = self.track(App(greeting=b"x"))
        d = self.connector(self.store(domain, API)).connect(self.endpoint(port, DB), app, "http1")
        failure = yield self.assertFailure(d, PeerIdentityMismatch)
        self.assertEqual((failure.expected, failure.presented), (DB, WEB))
        self.assertFalse(app.made)
        yield self.gone(port)
        self.assertEqual(port.ready, [])
        self.assertEqual(self.errors(metrics=self.client_metrics, direction="outbound"),
                         {"identity_mismatch": 1.0})
        self.assertEqual(sum(self.errors().values()), 1.0)

    @defer.inlineCallbacks
    def test_untrusted_server(self):
        """
        A server from another trust domain fails the Deferred with a TLS error; the server counts the
        client's rejection.
        """
        port = yield self.listen(self.store(self.trust_domain(), WEB))
        app = self.track(App())
        d = self.connector(self.store(self.trust_domain(), API)).connect(self.endpoint(port), app, None)
        failure = yield self.assertFailure(d, SSL.Error)
        self.assertIn("certificate verify failed", str(failure))
        self.assertFalse(app.made)
        yield self.gone(port)
        self.assertEqual(self.errors(), {"peer_rejected": 1.0})
        self.assertEqual(sum(self.errors(metrics=self.client_metrics, direction="outbound").values()), 1.0)

    @defer.inlineCallbacks
    def test_untrusted_client(self):
        """
        A client whose certificate comes from another trust domain (though it trusts the server) is refused
        by the server, which counts C{untrusted} and never hands the connection over.
        """
        server_domain, client_domain = self.trust_domain(), self.trust_domain()
        with open(os.path.join(server_domain, "ca.pem"), "rb") as src:
            with open(os.path.join(client_domain, "ca.pem"), "ab") as dst:
                dst.write(src.read())
        port = yield self.listen(self.store(server_domain, WEB))
        yield self.refused_client(port, self.store(client_domain, API))
        self.assertEqual(self.errors(), {"untrusted": 1.0})

    @defer.inlineCallbacks
    def test_expired_client_certificate(self):
        """
        A client whose leaf expired is refused and counted as C{cert_expired}.
        """
        past = time.time() - 3 * DAY
        domain = self.trust_domain(now=past)
        client = self.store(domain, API, at=past + DAY)
        self.assertLess(client.current.not_after, time.time())
        port = yield self.listen(self.store(domain, WEB))
        yield self.refused_client(port, client)
        self.assertEqual(self.errors(), {"cert_expired": 1.0})

    @defer.inlineCallbacks
    def test_expired_server_certificate(self):
        """
        A server whose leaf expired fails the client's Deferred.
        """
        past = time.time() - 3 * DAY
        domain = self.trust_domain(now=past)
        port = yield self.listen(self.store(domain, WEB, at=past + DAY))
        app = App()
        d = self.connector(self.store(domain, API)).connect(self.endpoint(port), app, None)
        yield self.assertFailure(d, SSL.Error)
        self.assertFalse(app.made)
        yield self.gone(port)
        self.assertEqual(self.errors(), {"peer_rejected": 1.0})

    def anonymous(self, domain):
        """
        TLS options for a client that verifies the server but has no certificate.
        """
        with open(os.path.join(domain, "ca.pem"), "rb") as f:
            anchor = Certificate.loadPEM(f.read())
        return optionsForClientTLS(WEB, trustRoot=anchor)

    @defer.inlineCallbacks
    def test_no_client_certificate_required(self):
        """
        Under C{require_client_cert}, a TLS client without a certificate is refused and counted as
        C{no_client_cert}.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), require_client_cert=True)
        app = yield self.tls_client(port, self.anonymous(domain), b"hello")
        yield app.lost
        yield self.gone(port)
        self.assertEqual(app.received, b"")
        self.assertEqual(port.ready, [])
        self.assertEqual(self.errors(), {"no_client_cert": 1.0})

    @defer.inlineCallbacks
    def test_no_client_certificate_optional_and_no_header(self):
        """
        With client certificates optional, a TLS client without one gets through with no client identity;
        it sends no transport header, so the stream is handed over as is, with no header.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), require_client_cert=False)
        app = yield self.tls_client(port, self.anonymous(domain), b"GET / HTTP/1.1\r\n\r\n")
        yield app.wait_for(b"GET / HTTP/1.1\r\n\r\n".upper())
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=None, server_id=WEB), None)])
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_silent_client_continues_without_header(self):
        """
        A client that offers no ALPN, completes the handshake and says nothing is handed over without a
        header when the header timeout passes (the server may speak first).
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), header_timeout=0.2,
                                 app=lambda: App(greeting=b"220 banner"))
        app = yield self.tls_client(port, client_connection_creator(self.store(domain, API), WEB), b"")
        yield app.wait_for(b"220 banner")
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=API, server_id=WEB), None)])
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_header_in_pieces(self):
        """
        A header that arrives split across TLS records (no ALPN) is reassembled, and the bytes after it are
        the app's.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        wire = transport_header.encode(7000, "web", "http2") + b"payload"
        app = yield self.tls_client(port, client_connection_creator(self.store(domain, API), WEB), wire[:5])
        for i in range(5, len(wire), 6):
            yield deferLater(self.reactor, 0.01, lambda: None)
            app.transport.write(wire[i:i + 6])
        yield app.wait_for(b"PAYLOAD")
        self.assertEqual(port.ready[0][1], TransportHeader(7000, "web", "http2"))
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_preface_lookalike_is_not_a_header(self):
        """
        Without ALPN, plaintext that starts like the preface and then diverges is no header: every byte
        reaches the app.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        app = yield self.tls_client(port, client_connection_creator(self.store(domain, API), WEB), b"trans")
        yield deferLater(self.reactor, 0.05, lambda: None)
        app.transport.write(b"fer log")
        yield app.wait_for(b"TRANSFER LOG")
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=API, server_id=WEB), None)])
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_malformed_header(self):
        """
        A transport header with an oversized length is refused and counted; nothing is handed over.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        app = yield self.tls_client(port, client_connection_creator(self.store(domain, API), WEB),
                                    transport_header.PREFACE + b"\xff\xff\xff\xff")
        yield app.lost
        yield self.gone(port)
        self.assertEqual(port.ready, [])
        self.assertEqual(self.errors(protocol_="transport_header"), {"malformed": 1.0})

    @defer.inlineCallbacks
    def test_incomplete_header_times_out(self):
        """
        A client that sends the whole preface and then stops is refused when the header timeout passes.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), header_timeout=0.2)
        app = yield self.tls_client(port, client_connection_creator(self.store(domain, API), WEB),
                                    transport_header.PREFACE + b"\x00\x00")
        yield app.lost
        yield self.gone(port)
        self.assertEqual(port.ready, [])
        self.assertEqual(self.errors(protocol_="transport_header"), {"incomplete": 1.0})

    def client_hello(self):
        """
        @return: the bytes of a real TLS 1.3 ClientHello with SNI set to our server's identity.
        """
        ctx = SSL.Context(SSL.TLS_METHOD)
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        conn.set_tlsext_host_name(WEB.encode())
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            pass
        return conn.bio_read(65536)

    @defer.inlineCallbacks
    def raw_client(self, port, data):
        """
        Connect a plain TCP client and send C{data}.
        """
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port.getHost().port)
        app = self.track(App(greeting=data))
        yield connectProtocol(endpoint, app)
        return app

    @defer.inlineCallbacks
    def test_handshake_timeout(self):
        """
        A client that sends a ClientHello for our identity and then nothing is closed after the handshake
        timeout and counted.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), handshake_timeout=0.2)
        app = yield self.raw_client(port, self.client_hello())
        yield app.lost
        yield self.gone(port)
        self.assertEqual(self.errors(), {"handshake_timeout": 1.0})

    @defer.inlineCallbacks
    def test_garbage_after_client_hello(self):
        """
        Garbage after a valid ClientHello fails the handshake; that connection alone is closed and counted,
        and the listener keeps serving others.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        bad = yield self.raw_client(port, self.client_hello() + b"\x17\x03\x03\x00\x05garbage" * 3)
        yield bad.lost
        yield defer.gatherResults([port.accepted[0].gone])
        self.assertEqual(self.errors(), {"handshake": 1.0})
        good = self.track(App(greeting=b"ok"))
        yield self.connector(self.store(domain, API)).connect(self.endpoint(port), good, None)
        yield good.wait_for(b"OK")
        good.transport.loseConnection()
        yield good.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_other_sni_not_terminated(self):
        """
        TLS for another name is not ours: L{MeshServer.accepts} says no (the assembly passes it through).
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        ctx = SSL.Context(SSL.TLS_METHOD)
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"example.com")
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            pass
        app = yield self.raw_client(port, conn.bio_read(65536))
        yield app.lost
        yield self.gone(port)
        self.assertEqual(len(port.other), 1)
        self.assertEqual(port.other[0].client_hello.sni, "example.com")

    @defer.inlineCallbacks
    def test_connect_timeout(self):
        """
        An inbound proxy that accepts TCP but never answers TLS fails the Deferred with C{TimeoutError}
        after the connect timeout (which covers TCP and TLS together); the protocol is never connected.
        """
        silent = protocol.Factory.forProtocol(protocol.Protocol)
        port = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(silent)
        self.addCleanup(port.stopListening)
        app = App()
        d = self.connector(self.store(self.trust_domain(), API), timeout=0.3).connect(self.endpoint(port), app)
        yield self.assertFailure(d, TimeoutError)
        self.assertFalse(app.made)
        # Let the aborted socket finish closing.
        yield deferLater(self.reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_cancel(self):
        """
        Cancelling the Deferred abandons the attempt; the protocol is never connected.
        """
        silent = protocol.Factory.forProtocol(protocol.Protocol)
        port = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(silent)
        self.addCleanup(port.stopListening)
        app = App()
        d = self.connector(self.store(self.trust_domain(), API)).connect(self.endpoint(port), app)
        yield deferLater(self.reactor, 0.05, lambda: None)
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        self.assertFalse(app.made)
        yield deferLater(self.reactor, 0.05, lambda: None)
        self.assertEqual(self.errors(metrics=self.client_metrics, direction="outbound"), {})


class AlpnTests(MeshHelpers, TestCase):
    """
    ALPN C{transport.l5d.io/v1} decides whether the transport header is written and read, as in
    linkerd2-proxy; a linkproxy from before it (offering and selecting no ALPN) is stood in for by a client
    creator without ALPN that writes the header itself, and by a L{MeshServer} with C{alpn=()}.
    """

    def old_client(self, store):
        """
        TLS as a linkproxy from before the ALPN made it as a client: the mesh's certificate and SNI, no ALPN.
        """
        return client_connection_creator(store, WEB)

    def alpn_client(self, store, alpn=(TRANSPORT_HEADER_ALPN,)):
        """
        TLS as the connector makes it (ALPN offered), for a client that then writes what the test says.
        """
        return client_connection_creator(store, WEB, alpn=alpn)

    @defer.inlineCallbacks
    def test_new_to_new(self):
        """
        Between two linkproxies, the connector offers C{transport.l5d.io/v1}, the server selects it, both
        ends see it negotiated, and the header is written and read: the server learns port and session
        protocol, and the app gets exactly the client's bytes after it.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        app = self.track(App(greeting=b"GET / HTTP/1.1\r\n\r\n"))
        yield self.connector(self.store(domain, API)).connect(self.endpoint(port, app_port=8081), app, "http1")
        yield app.wait_for(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(app.transport.negotiatedProtocol, b"transport.l5d.io/v1")
        self.assertEqual(port.apps[0].transport.negotiatedProtocol, b"transport.l5d.io/v1")
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=API, server_id=WEB),
                                       TransportHeader(8081, "", "http1"))])
        self.assertEqual(port.apps[0].received, b"GET / HTTP/1.1\r\n\r\n")
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)
        self.assertEqual(self.errors(protocol_="transport_header"), {})

    @defer.inlineCallbacks
    def test_connector_offers_only_transport_alpn(self):
        """
        The connector's ClientHello offers exactly one ALPN protocol, C{transport.l5d.io/v1}.
        """
        domain = self.trust_domain()
        contexts = server_context_factory(self.store(domain, WEB), require_client_cert=True)
        offers = []
        contexts.getContext().set_alpn_select_callback(lambda conn, offered: offers.append(offered) or offered[0])
        apps = []
        server = protocol.Factory()
        server.buildProtocol = lambda addr: apps.append(App(echo=True)) or apps[-1]
        port = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(
            TLSMemoryBIOFactory(contexts, False, server))
        self.addCleanup(port.stopListening)
        app = self.track(App(greeting=b"x"))
        yield self.connector(self.store(domain, API)).connect(self.endpoint(port), app, None)
        # The server selected what was offered, so the header came first.
        yield app.wait_for(transport_header.encode(8080).upper() + b"X")
        self.assertEqual(offers, [[b"transport.l5d.io/v1"]])
        app.transport.loseConnection()
        yield defer.gatherResults([app.lost, apps[0].lost])

    @defer.inlineCallbacks
    def test_new_client_to_old_server(self):
        """
        A server that selects no ALPN (a linkproxy from before it) negotiates nothing, so the connector
        writes no header, as linkerd2-proxy does: the server gets the client's bytes from the first one and
        takes the stream as a client without a header (it then detects the protocol and uses its configured
        app address).
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), alpn=())
        app = self.track(App(greeting=b"GET / HTTP/1.1\r\n\r\n"))
        yield self.connector(self.store(domain, API)).connect(self.endpoint(port), app, "http1")
        yield app.wait_for(b"GET / HTTP/1.1\r\n\r\n")
        self.assertIsNone(app.transport.negotiatedProtocol)
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=API, server_id=WEB), None)])
        self.assertEqual(port.apps[0].received, b"GET / HTTP/1.1\r\n\r\n")
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)
        self.assertEqual(self.errors(protocol_="transport_header"), {})

    @defer.inlineCallbacks
    def test_old_client_to_new_server(self):
        """
        A client that offers no ALPN and writes the header anyway (a linkproxy from before ALPN) is still
        understood: nothing is negotiated, the header is recognised by its preface and read.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        wire = transport_header.encode(9090, session_protocol="http2") + b"payload"
        app = yield self.tls_client(port, self.old_client(self.store(domain, API)), wire)
        yield app.wait_for(b"PAYLOAD")
        self.assertIsNone(app.transport.negotiatedProtocol)
        self.assertIsNone(port.apps[0].transport.negotiatedProtocol)
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=API, server_id=WEB),
                                       TransportHeader(9090, "", "http2"))])
        self.assertEqual(port.apps[0].received, b"payload")
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_old_client_without_header_to_new_server(self):
        """
        Without ALPN, a client that sends no header is still served as before: its bytes are the stream.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        app = yield self.tls_client(port, self.old_client(self.store(domain, API)), b"GET / HTTP/1.1\r\n\r\n")
        yield app.wait_for(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(port.ready, [(PeerInfo(tls="true", client_id=API, server_id=WEB), None)])
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def test_other_alpn_is_served_as_none(self):
        """
        A client that offers only other protocols negotiates none, and is served like a client offering
        none: no header needed.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        app = yield self.tls_client(port, self.alpn_client(self.store(domain, API), (b"h2", b"http/1.1")),
                                    b"PRI * HTTP/2.0")
        yield app.wait_for(b"PRI * HTTP/2.0")
        self.assertIsNone(app.transport.negotiatedProtocol)
        self.assertEqual(port.ready[0][1], None)
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)

    @defer.inlineCallbacks
    def refused_after_alpn(self, port, greeting, label):
        """
        Connect offering the ALPN, send C{greeting}, and expect the server to negotiate it, hand nothing over,
        close the connection and count C{label}.
        """
        app = yield self.tls_client(port, self.alpn_client(self.store(self.domain, API)), greeting)
        yield app.lost
        yield self.gone(port)
        self.assertEqual(app.received, b"")
        self.assertEqual(port.ready, [])
        self.assertEqual(port.apps, [])
        self.assertEqual(self.errors(protocol_="transport_header"), {label: 1.0})
        self.assertEqual(self.errors(), {})

    @defer.inlineCallbacks
    def test_alpn_without_header_refused(self):
        """
        A client that negotiated C{transport.l5d.io/v1} promised a header: plaintext that is not one is
        refused at once, and counted as C{error="missing"}.
        """
        self.domain = self.trust_domain()
        port = yield self.listen(self.store(self.domain, WEB))
        yield self.refused_after_alpn(port, b"GET / HTTP/1.1\r\n\r\n", "missing")

    @defer.inlineCallbacks
    def test_alpn_silent_client_refused(self):
        """
        After negotiating the ALPN, saying nothing until the header timeout is refused as C{missing} (without
        the ALPN, the same client would be handed over, the server may speak first).
        """
        self.domain = self.trust_domain()
        port = yield self.listen(self.store(self.domain, WEB), header_timeout=0.2)
        yield self.refused_after_alpn(port, b"", "missing")

    @defer.inlineCallbacks
    def eof_after_alpn(self, data, label):
        """
        Negotiate the ALPN, send C{data}, close (close_notify), and expect a refusal counted as C{label}.
        """
        self.domain = self.trust_domain()
        port = yield self.listen(self.store(self.domain, WEB))

        @implementer(IHandshakeListener)
        class Closer(App):
            """
            Sends C{data} and closes as soon as its handshake is done (close_notify follows the data).
            """

            def handshakeCompleted(self):
                if data:
                    self.transport.write(data)
                self.transport.loseConnection()

        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port.getHost().port)
        app = self.track(Closer())
        yield connectProtocol(wrapClientTLS(self.alpn_client(self.store(self.domain, API)), endpoint), app)
        yield app.lost
        yield self.gone(port)
        self.assertEqual(port.ready, [])
        self.assertEqual((self.errors(protocol_="transport_header"), self.errors()), ({label: 1.0}, {}))

    def test_alpn_eof_without_header_refused(self):
        """
        After negotiating the ALPN, closing without a byte is refused as C{missing}.
        """
        return self.eof_after_alpn(b"", "missing")

    def test_alpn_eof_in_preface_refused(self):
        """
        After negotiating the ALPN, closing after part of the preface is refused as C{incomplete} (without the
        ALPN, those bytes would be handed over as the stream).
        """
        return self.eof_after_alpn(b"transport.", "incomplete")

    @defer.inlineCallbacks
    def test_alpn_partial_preface_refused(self):
        """
        After negotiating the ALPN, a few bytes of the preface and then nothing are refused as C{incomplete}
        when the header timeout passes (without the ALPN they would be handed over as the stream).
        """
        self.domain = self.trust_domain()
        port = yield self.listen(self.store(self.domain, WEB), header_timeout=0.2)
        yield self.refused_after_alpn(port, b"transport.", "incomplete")

    @defer.inlineCallbacks
    def test_alpn_malformed_header_refused(self):
        """
        After negotiating the ALPN, a malformed header is refused as C{malformed}, as without it.
        """
        self.domain = self.trust_domain()
        port = yield self.listen(self.store(self.domain, WEB))
        yield self.refused_after_alpn(port, transport_header.PREFACE + b"\xff\xff\xff\xff", "malformed")

    @defer.inlineCallbacks
    def test_alpn_header_in_pieces(self):
        """
        After negotiating the ALPN, a header split across records is reassembled as without it.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB))
        wire = transport_header.encode(7000, "web", "http2") + b"payload"
        app = yield self.tls_client(port, self.alpn_client(self.store(domain, API)), wire[:3])
        for i in range(3, len(wire), 7):
            yield deferLater(self.reactor, 0.01, lambda: None)
            app.transport.write(wire[i:i + 7])
        yield app.wait_for(b"PAYLOAD")
        self.assertEqual(port.ready[0][1], TransportHeader(7000, "web", "http2"))
        app.transport.loseConnection()
        yield app.lost
        yield self.gone(port)


class SynchronousMeshTests(MeshHelpers, SynchronousTestCase):
    """
    The parts that need no sockets.
    """

    def test_not_ready(self):
        """
        Before the store has an identity, the connector fails at once and the server refuses and counts.
        """
        store = IdentityStore(self.trust_domain(), WEB, reactor=Clock())
        endpoint = Endpoint(address=("127.0.0.1", 80), identity=API, proxy=("127.0.0.1", 4143))
        self.failureResultOf(MeshConnector(store, Clock(), 1.0).connect(endpoint, App()), IdentityNotReady)
        mesh = MeshServer(store, metrics=self.metrics, reactor=Clock())
        proto = mesh.protocol(lambda peer, header: None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(self.errors(), {"identity_not_ready": 1.0})

    def test_unmeshed_endpoint(self):
        """
        An endpoint without identity and proxy is not for the mesh connector.
        """
        store = self.store(self.trust_domain(), API)
        d = MeshConnector(store, Clock(), 1.0).connect(Endpoint(address=("127.0.0.1", 80)), App())
        self.failureResultOf(d, ValueError)
        self.assertRaises(ValueError, MeshConnector, store, Clock(), 0)

    def test_bad_session_protocol(self):
        """
        An unknown session protocol fails the Deferred rather than raising.
        """
        store = self.store(self.trust_domain(), API)
        endpoint = Endpoint(address=("127.0.0.1", 80), identity=WEB, proxy=("127.0.0.1", 4143))
        self.failureResultOf(MeshConnector(store, Clock(), 1.0).connect(endpoint, App(), "h3"), ValueError)

    def test_alpn_names_the_preface(self):
        """
        The ALPN protocol is the transport header's preface without its blank line.
        """
        self.assertEqual(TRANSPORT_HEADER_ALPN + b"\r\n\r\n", transport_header.PREFACE)

    def test_error_labels(self):
        """
        TLS failures map to a small, fixed set of labels.
        """
        def ssl(text):
            return Failure(SSL.Error([("SSL routines", "", text)]))
        self.assertEqual(tls_error_label(ssl("peer did not return a certificate")), "no_client_cert")
        self.assertEqual(tls_error_label(ssl("certificate verify failed"), 10), "cert_expired")
        self.assertEqual(tls_error_label(ssl("certificate verify failed"), 9), "cert_not_yet_valid")
        self.assertEqual(tls_error_label(ssl("certificate verify failed"), 20), "untrusted")
        self.assertEqual(tls_error_label(ssl("certificate verify failed"), 7), "cert_invalid")
        self.assertEqual(tls_error_label(ssl("tlsv1 alert unknown ca")), "peer_rejected")
        self.assertEqual(tls_error_label(ssl("tlsv13 alert certificate required")), "peer_rejected")
        self.assertEqual(tls_error_label(ssl("unsupported protocol")), "version")
        self.assertEqual(tls_error_label(ssl("wrong version number")), "version")
        self.assertEqual(tls_error_label(ssl("record layer failure")), "handshake")
        self.assertEqual(tls_error_label(Failure(PeerIdentityMismatch(WEB, DB))), "identity_mismatch")
        self.assertEqual(tls_error_label(Failure(ConnectionError())), "eof")


class AuthzTests(SynchronousTestCase):
    """
    L{authz_metrics} and L{AuthorizingRouter}.
    """

    def setUp(self):
        self.metrics = Metrics(process=False)
        self.authz = authz_metrics(self.metrics)

    def sample(self, name, **labels):
        """
        @return: a sample's value, or L{None}.
        """
        return self.metrics.registry.get_sample_value(name, labels)

    def test_cached_per_registry(self):
        """
        One set of families per registry: asking twice gives the same object, another registry another.
        """
        self.assertIs(authz_metrics(self.metrics), self.authz)
        self.assertIsNot(authz_metrics(Metrics(process=False)), self.authz)

    def test_plaintext_denied_when_mtls_required(self):
        """
        A plaintext connection under C{authenticated} is denied (C{no_tls}) and counted as a TCP denial; a
        meshed one is allowed and counted as an allowance with its client identity.
        """
        denied = self.authz.decide("tcp", "authenticated", (), PLAIN, "127.0.0.1:8080")
        self.assertEqual((denied.allowed, denied.reason), (False, "no_tls"))
        denied.count()
        self.assertEqual(self.sample("inbound_tcp_authz_deny_total", target_addr="127.0.0.1:8080",
                                     policy="authenticated", tls="no_identity", client_id="", reason="no_tls",
                                     **_srv("all-authenticated", "8080")), 1.0)
        peer = PeerInfo(tls="true", client_id=API, server_id=WEB)
        allowed = self.authz.decide("tcp", "authenticated", (), peer, "127.0.0.1:8080")
        self.assertTrue(allowed.allowed)
        allowed.count()
        self.assertEqual(self.sample("inbound_tcp_authz_allow_total", target_addr="127.0.0.1:8080",
                                     policy="authenticated", tls="true", client_id=API,
                                     **_srv("all-authenticated", "8080", authz=True)), 1.0)

    def test_http_router(self):
        """
        L{AuthorizingRouter} counts every request and answers denied ones with L{Forbidden}.
        """
        router = FixedRouter(Endpoint(address=("127.0.0.1", 8080)))
        peer = PeerInfo(tls="true", client_id=WEB, server_id=WEB)
        denied = AuthorizingRouter(router, self.authz.decide("http", "allow", (API,), peer, "127.0.0.1:8080"))
        verifyObject(IRouter, denied)
        for _ in range(2):
            failure = self.failureResultOf(denied.route("web:80"), Forbidden)
        self.assertIn("not_allowed", failure.value.reason)
        self.assertEqual(self.sample("inbound_http_authz_deny_total", target_addr="127.0.0.1:8080", policy="allow",
                                     tls="true", client_id=WEB, reason="not_allowed",
                                     **_srv("identity-allow-list", "8080")), 2.0)
        allowed = AuthorizingRouter(router, self.authz.decide("http", "unauthenticated", (), PLAIN, "a:1"))
        self.assertEqual(self.successResultOf(allowed.route("web:80")).endpoint.address, ("127.0.0.1", 8080))
        self.assertEqual(self.sample("inbound_http_authz_allow_total", target_addr="a:1",
                                     policy="unauthenticated", tls="no_identity", client_id="",
                                     **_srv("all-unauthenticated", "1", authz=True)), 1.0)

    def test_client_ids_bounded(self):
        """
        Past the bound, new client identities fold into C{overflow}.
        """
        from linkproxy.net import authz as authz_module
        self.patch(authz_module, "MAX_AUTHZ_CLIENT_IDS", 2)
        authz = authz_module.AuthzMetrics(Metrics(process=False).registry)
        for i in range(4):
            peer = PeerInfo(tls="true", client_id=f"c{i}.ns.serviceaccount.identity.linkproxy.local")
            authz.decide("tcp", "authenticated", (), peer, "t:1").count()
        self.assertEqual(len(authz._client_ids), 2)
