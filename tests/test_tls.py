"""
Tests for L{linkproxy.net.tls}: real loopback mTLS between Twisted endpoints on 127.0.0.1, using contexts
that follow an L{IdentityStore}, plus interop with C{openssl s_client}.
"""

import os
import shutil
import time

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from linkproxy.identity import ca
from linkproxy.identity.store import IdentityStore
from linkproxy.net.tls import (
    PeerIdentityMismatch,
    client_connection_creator,
    peer_identity,
    server_context_factory,
)

WEB = "web.default.serviceaccount.identity.linkproxy.local"
API = "api.default.serviceaccount.identity.linkproxy.local"
DAY = 86400


@implementer(IHandshakeListener)
class Greeter(protocol.Protocol):
    """
    Server side: answers every line with C{hello <peer identity>}, or C{hello anonymous}.
    """

    def connectionMade(self):
        self.lost = defer.Deferred()
        self.peer = None
        self.handshake_done = False
        self.factory.connections.append(self)

    def handshakeCompleted(self):
        self.handshake_done = True
        self.peer = peer_identity(self.transport)
        self.alpn = self.transport.negotiatedProtocol

    def dataReceived(self, data):
        for _ in range(data.count(b"\n")):
            self.transport.write(b"hello " + (self.peer or "anonymous").encode() + b"\n")

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class Caller(protocol.Protocol):
    """
    Client side: sends C{ping} lines and collects the answers.
    """

    def __init__(self):
        self.received = b""
        self.lost = defer.Deferred()
        self._waiting = None

    def connectionMade(self):
        # Written before the handshake finishes; the TLS layer holds it until then.
        self.transport.write(b"ping\n")

    def ping(self):
        """
        @return: a Deferred firing with the next answer line.
        """
        self.transport.write(b"ping\n")
        return self.answer()

    def answer(self):
        """
        @return: a Deferred firing with the next complete line received.
        """
        self._waiting = defer.Deferred()
        self._deliver()
        return self._waiting

    def _deliver(self):
        if self._waiting is not None and b"\n" in self.received:
            line, self.received = self.received.split(b"\n", 1)
            waiting, self._waiting = self._waiting, None
            waiting.callback(line)

    def dataReceived(self, data):
        self.received += data
        self._deliver()

    def connectionLost(self, reason):
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(reason)
        self.reason = reason
        self.lost.callback(None)


class TLSHelpers:
    """
    Trust domains, stores, a listener and a connector for the TLS tests, on the real reactor.
    """

    timeout = 30

    def setUp(self):
        from twisted.internet import reactor
        self.reactor = reactor

    def trust_domain(self, now=None):
        """
        @return: a new identity directory holding an anchor and an issuer.
        """
        directory = self.mktemp()
        ca.init_trust_domain(directory, now=now)
        return directory

    def store(self, directory, name, at=None):
        """
        A started, self-issuing store whose timers run on its own L{Clock} (set to C{at}, default now),
        so a test decides when it renews.
        """
        clock = Clock()
        clock.advance(time.time() if at is None else at)
        store = IdentityStore(directory, name, reactor=clock)
        store.start()
        store.clock = clock
        self.addCleanup(store.stop)
        return store

    @defer.inlineCallbacks
    def listen(self, server_store, require_client_cert=True, alpn=()):
        """
        Listen on 127.0.0.1 with the server context; returns the port, whose factory records connections.
        """
        factory = protocol.Factory.forProtocol(Greeter)
        factory.connections = []
        tls = TLSMemoryBIOFactory(
            server_context_factory(server_store, require_client_cert=require_client_cert, alpn=alpn), False,
            factory)
        port = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(tls)
        self.addCleanup(port.stopListening)
        port.greeters = factory.connections
        return port

    def connect(self, port, creator):
        """
        Connect a L{Caller} to C{port} through TLS made by C{creator}.
        """
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port.getHost().port)
        d = wrapClientTLS(creator, endpoint).connect(protocol.Factory.forProtocol(Caller))
        d.addCallback(self._abort_at_cleanup)
        return d

    def _abort_at_cleanup(self, caller):
        """
        Make sure a connection a failed test left open does not leave the reactor dirty.
        """
        def abort():
            if not caller.lost.called:
                caller.transport.abortConnection()
            return caller.lost
        self.addCleanup(abort)
        return caller

    @defer.inlineCallbacks
    def close(self, port, *callers):
        """
        Close the callers and wait until both ends of every connection are gone.
        """
        for caller in callers:
            caller.transport.loseConnection()
        yield defer.gatherResults([c.lost for c in callers] + [g.lost for g in port.greeters])

    @defer.inlineCallbacks
    def refused(self, port, creator):
        """
        Connect and expect the handshake to fail on both ends without any application data.

        @return: the client protocol; its C{reason} says why the connection was lost.
        """
        caller = yield self.connect(port, creator)
        yield caller.lost
        yield defer.gatherResults([g.lost for g in port.greeters])
        self.assertEqual(caller.received, b"")
        self.assertEqual([g.peer for g in port.greeters], [None])
        return caller


class TLSTests(TLSHelpers, TestCase):
    """
    Mutual TLS between proxies over real loopback sockets.
    """

    @defer.inlineCallbacks
    def test_mutual_identities(self):
        """
        A client and a server from one trust domain connect over TLS 1.3; each sees the other's
        verified identity, and the server can tell the client's (for l5d-client-id).
        """
        domain = self.trust_domain()
        server, client = self.store(domain, WEB), self.store(domain, API)
        port = yield self.listen(server)
        caller = yield self.connect(port, client_connection_creator(client, WEB))
        line = yield caller.answer()
        self.assertEqual(line, b"hello " + API.encode())
        self.assertEqual(port.greeters[0].peer, API)
        self.assertEqual(peer_identity(caller.transport), WEB)
        handle = caller.transport.getHandle()
        self.assertEqual(handle.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(handle.get_servername(), WEB.encode())
        yield self.close(port, caller)

    @defer.inlineCallbacks
    def test_wrong_server_identity(self):
        """
        A server whose trusted certificate names another identity than the client dialled fails the
        handshake, and the client learns why.
        """
        domain = self.trust_domain()
        server, client = self.store(domain, WEB), self.store(domain, API)
        port = yield self.listen(server)
        expected = "db.default.serviceaccount.identity.linkproxy.local"
        caller = yield self.refused(port, client_connection_creator(client, expected))
        reason = caller.reason
        reason.trap(PeerIdentityMismatch)
        self.assertEqual(reason.value.expected, expected)
        self.assertEqual(reason.value.presented, WEB)

    @defer.inlineCallbacks
    def test_untrusted_ca(self):
        """
        A server from another trust domain (same name, different anchor) is refused by the client.
        """
        server = self.store(self.trust_domain(), WEB)
        client = self.store(self.trust_domain(), API)
        port = yield self.listen(server)
        caller = yield self.refused(port, client_connection_creator(client, WEB))
        reason = caller.reason
        reason.trap(SSL.Error)
        self.assertIn("certificate verify failed", str(reason.value))

    @defer.inlineCallbacks
    def test_untrusted_client(self):
        """
        A client certificate from another trust domain is refused by the server, even when client
        certificates are optional.
        """
        server_domain = self.trust_domain()
        server = self.store(server_domain, WEB)
        # The client trusts both anchors, so it accepts the server, but its leaf comes from its own
        # domain, which the server does not trust.
        client_domain = self.trust_domain()
        with open(os.path.join(server_domain, "ca.pem"), "rb") as src:
            with open(os.path.join(client_domain, "ca.pem"), "ab") as dst:
                dst.write(src.read())
        client = self.store(client_domain, API)
        self.assertEqual(len(client.current.anchors), 2)
        port = yield self.listen(server, require_client_cert=False)
        caller = yield self.refused(port, client_connection_creator(client, WEB))
        reason = caller.reason
        reason.trap(SSL.Error)

    @defer.inlineCallbacks
    def test_expired_certificate(self):
        """
        A server whose leaf expired (issued two days ago for a day) is refused.
        """
        past = time.time() - 3 * DAY
        domain = self.trust_domain(now=past)
        server = self.store(domain, WEB, at=past + DAY)
        self.assertLess(server.current.not_after, time.time())
        client = self.store(domain, API)
        port = yield self.listen(server)
        caller = yield self.refused(port, client_connection_creator(client, WEB))
        reason = caller.reason
        reason.trap(SSL.Error)
        self.assertIn("certificate verify failed", str(reason.value))

    def anonymous_client(self, domain):
        """
        A client that verifies the server but has no certificate of its own (Twisted's own TLS options).
        """
        with open(os.path.join(domain, "ca.pem"), "rb") as f:
            anchor = Certificate.loadPEM(f.read())
        return optionsForClientTLS(WEB, trustRoot=anchor)

    @defer.inlineCallbacks
    def test_client_cert_required(self):
        """
        When client certificates are required, a client without one gets no application data through.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), require_client_cert=True)
        caller = yield self.refused(port, self.anonymous_client(domain))
        reason = caller.reason
        reason.trap(SSL.Error)
        self.assertFalse(port.greeters[0].handshake_done)

    @defer.inlineCallbacks
    def test_client_cert_optional(self):
        """
        When client certificates are optional, a client without one connects and has no identity.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), require_client_cert=False)
        caller = yield self.connect(port, self.anonymous_client(domain))
        line = yield caller.answer()
        self.assertEqual(line, b"hello anonymous")
        self.assertIsNone(port.greeters[0].peer)
        yield self.close(port, caller)

    @defer.inlineCallbacks
    def test_rotation(self):
        """
        After both stores renew, a new connection uses the new certificates on both sides, while a
        connection made before the rotation keeps working.
        """
        # The stores' clocks start 0.7 days in the past, so that after renewal their certificates are
        # current by the real clock OpenSSL uses.
        start = time.time() - 0.7 * DAY
        domain = self.trust_domain(now=start - 3600)
        server, client = self.store(domain, WEB, at=start), self.store(domain, API, at=start)
        port = yield self.listen(server)
        creator = client_connection_creator(client, WEB)

        old = yield self.connect(port, creator)
        self.assertEqual((yield old.answer()), b"hello " + API.encode())
        old_server_serial = old.transport.getHandle().get_peer_certificate(as_cryptography=True).serial_number
        self.assertEqual(old_server_serial, server.current.leaf.serial_number)
        old_client_cert = port.greeters[0].transport.getHandle().get_peer_certificate(as_cryptography=True)

        server.clock.advance(0.7 * DAY)
        client.clock.advance(0.7 * DAY)
        self.assertEqual(server.current.generation, 2)
        self.assertEqual(client.current.generation, 2)

        new = yield self.connect(port, creator)
        self.assertEqual((yield new.answer()), b"hello " + API.encode())
        new_server_cert = new.transport.getHandle().get_peer_certificate(as_cryptography=True)
        self.assertEqual(new_server_cert, server.current.leaf)
        self.assertNotEqual(new_server_cert.serial_number, old_server_serial)
        new_client_cert = port.greeters[1].transport.getHandle().get_peer_certificate(as_cryptography=True)
        self.assertEqual(new_client_cert, client.current.leaf)
        self.assertNotEqual(new_client_cert, old_client_cert)

        self.assertEqual((yield old.ping()), b"hello " + API.encode())
        yield self.close(port, old, new)

    @defer.inlineCallbacks
    def alpn_handshake(self, client_alpn, server_alpn):
        """
        Complete an mTLS handshake with C{client_alpn} offered and C{server_alpn} selectable.

        @return: what the client and the server each see negotiated.
        """
        domain = self.trust_domain()
        port = yield self.listen(self.store(domain, WEB), alpn=server_alpn)
        caller = yield self.connect(port, client_connection_creator(self.store(domain, API), WEB,
                                                                    alpn=client_alpn))
        self.assertEqual((yield caller.answer()), b"hello " + API.encode())
        negotiated = (caller.transport.negotiatedProtocol, port.greeters[0].alpn)
        yield self.close(port, caller)
        return negotiated

    @defer.inlineCallbacks
    def test_alpn_off_by_default(self):
        """
        By default the contexts neither offer nor select an ALPN protocol.
        """
        self.assertEqual((yield self.alpn_handshake((), ())), (None, None))
        # A server that selects nothing ignores what a client offers.
        self.assertEqual((yield self.alpn_handshake((b"transport.l5d.io/v1",), ())), (None, None))

    @defer.inlineCallbacks
    def test_alpn_negotiated(self):
        """
        A protocol the client offers and the server selects is negotiated, and both ends see it.
        """
        self.assertEqual((yield self.alpn_handshake((b"transport.l5d.io/v1",), (b"transport.l5d.io/v1",))),
                         (b"transport.l5d.io/v1", b"transport.l5d.io/v1"))
        # The server picks by its own preference among what is offered.
        self.assertEqual((yield self.alpn_handshake((b"h2", b"transport.l5d.io/v1"), (b"transport.l5d.io/v1",))),
                         (b"transport.l5d.io/v1", b"transport.l5d.io/v1"))

    @defer.inlineCallbacks
    def test_alpn_no_overlap_is_not_refused(self):
        """
        A client that offers only protocols the server does not select, or none, completes the handshake
        with no protocol negotiated (no alert).
        """
        self.assertEqual((yield self.alpn_handshake((b"h2", b"http/1.1"), (b"transport.l5d.io/v1",))),
                         (None, None))
        self.assertEqual((yield self.alpn_handshake((), (b"transport.l5d.io/v1",))), (None, None))

    def test_contexts_cached_per_generation(self):
        """
        Client creators for different servers share one context per store generation, as does the
        server factory; a renewal brings a new context, and connections stay per use.
        """
        domain = self.trust_domain(now=time.time() - DAY)
        store = self.store(domain, WEB, at=time.time() - DAY)
        to_api = client_connection_creator(store, API)
        to_db = client_connection_creator(store, "db.default.serviceaccount.identity.linkproxy.local")
        server = server_context_factory(store, require_client_cert=True)
        first, second = to_api.clientConnectionForTLS(None), to_db.clientConnectionForTLS(None)
        self.assertIsNot(first, second)
        self.assertIs(first.get_context(), second.get_context())
        self.assertIs(server.getContext(), server.getContext())
        # One client context per ALPN list, too.
        alpn = client_connection_creator(store, API, alpn=(b"transport.l5d.io/v1",))
        self.assertIsNot(alpn.clientConnectionForTLS(None).get_context(), first.get_context())
        self.assertIs(alpn.clientConnectionForTLS(None).get_context(),
                      client_connection_creator(store, API, alpn=[b"transport.l5d.io/v1"])
                      .clientConnectionForTLS(None).get_context())
        before = (first.get_context(), server.getContext())

        store.clock.advance(0.7 * DAY)
        after = (to_api.clientConnectionForTLS(None).get_context(), server.getContext())
        self.assertIsNot(after[0], before[0])
        self.assertIsNot(after[1], before[1])

    def test_bad_server_identity(self):
        """
        A server identity that is not a DNS name is refused when the creator is made.
        """
        store = self.store(self.trust_domain(), API)
        self.assertRaises(ca.IdentityError, client_connection_creator, store, "not a name")

    def test_not_ready(self):
        """
        Contexts cannot be made before the store has an identity.
        """
        store = IdentityStore(self.trust_domain(), WEB, reactor=Clock())
        factory = server_context_factory(store, require_client_cert=True)
        self.assertRaises(ca.IdentityError, factory.getContext)


class OpenSSLClientProcess(protocol.ProcessProtocol):
    """
    Collects a child's output and tells when it has printed a marker and when it has ended.
    """

    def __init__(self, marker):
        self.marker = marker
        self.out = b""
        self.err = b""
        self.seen = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data
        if self.marker in self.out and not self.seen.called:
            self.seen.callback(self.out)

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        if not self.seen.called:
            self.seen.errback(AssertionError(
                f"openssl ended without {self.marker!r}: out={self.out!r} err={self.err!r}"))
        self.ended.callback(None)


class OpenSSLInteropTests(TLSHelpers, TestCase):
    """
    The inbound context against the C{openssl s_client} command line tool.
    """

    openssl = shutil.which("openssl")
    if openssl is None:
        skip = "openssl command not found"

    @defer.inlineCallbacks
    def test_s_client(self):
        """
        openssl s_client with a client certificate from the trust domain completes TLS 1.3 mutual
        authentication, verifies the server's name, and is identified by the server.
        """
        domain = self.trust_domain()
        # s_client needs its certificate on disk: issue the client's leaf into the directory.
        ca.issue_leaf(domain, API)
        port = yield self.listen(self.store(domain, WEB), require_client_cert=True)
        path = lambda name: os.path.join(domain, name)  # noqa: E731
        argv = [self.openssl, "s_client", "-connect", f"127.0.0.1:{port.getHost().port}",
                "-servername", WEB, "-verify_hostname", WEB, "-verify_return_error", "-tls1_3", "-quiet",
                "-cert", path("cert.pem"), "-cert_chain", path("cert.pem"), "-key", path("key.pem"),
                "-CAfile", path("ca.pem")]
        proc = OpenSSLClientProcess(b"hello " + API.encode())
        transport = self.reactor.spawnProcess(proc, self.openssl, argv, env={"PATH": os.environ.get("PATH", "")})

        def kill():
            if transport.pid is not None:
                transport.signalProcess("KILL")
        self.addCleanup(lambda: proc.ended)
        self.addCleanup(kill)
        transport.write(b"ping\n")
        yield proc.seen
        self.assertEqual(port.greeters[0].peer, API)
        kill()
        yield proc.ended
        yield defer.gatherResults([g.lost for g in port.greeters])
