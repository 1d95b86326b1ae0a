"""
Linkerd's labels and families on linkproxy's metrics: TLS labels, dst_* from discovery, errno and lifetimes
of TCP closes, TCP metrics of HTTP connections (accepted and opened), proxy errors, build info, detection
latency.
"""

import errno

from prometheus_client.exposition import generate_latest
from twisted.internet import defer, protocol, reactor as global_reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from linkproxy.admin.metrics import (
    MAX_DST_LABELS, MAX_LABEL_VALUE, Metrics, TcpConnection, close_reason, dst_labels, error_label, tls_labels,
)
from linkproxy.core.detect import Protocol as Detected
from linkproxy.core.endpoint import Endpoint
from linkproxy.core.errors import NoEndpoints, ResponseTimeout
from linkproxy.net.connect import Connector
from linkproxy.net.sniff import SniffingProtocol
from linkproxy.net.tcp import MeteredConnector


class LabelTests(SynchronousTestCase):
    """
    The label helpers.
    """

    def test_tls_labels(self):
        """
        C{tls="true"} goes with the peer's identity; anything else is C{no_identity} with its reason.
        """
        self.assertEqual(tls_labels("true", "server_id", "web.ns"), (("tls", "true"), ("server_id", "web.ns")))
        self.assertEqual(tls_labels("true", "client_id", ""), (("tls", "true"),))
        self.assertEqual(tls_labels("false", no_tls_reason="loopback"),
                         (("tls", "no_identity"), ("no_tls_reason", "loopback")))
        self.assertEqual(tls_labels("no_identity"), (("tls", "no_identity"),))

    def test_dst_labels(self):
        """
        Endpoint labels become C{dst_*}, sorted; keys that are not label names are skipped; bounded.
        """
        endpoint = Endpoint(address=("10.0.0.1", 80), labels={"pod": "web-0", "namespace": "default",
                                                              "bad-key": "x", "long": "v" * 300})
        self.assertEqual(dst_labels(endpoint), (("dst_long", "v" * MAX_LABEL_VALUE), ("dst_namespace", "default"),
                                                ("dst_pod", "web-0")))
        many = Endpoint(address=("10.0.0.1", 80), labels={f"k{i:02}": "v" for i in range(40)})
        self.assertEqual(len(dst_labels(many)), MAX_DST_LABELS)
        self.assertEqual(dst_labels(Endpoint(address=("10.0.0.1", 80))), ())
        self.assertEqual(dst_labels(None), ())

    def test_close_reason(self):
        """
        Clean closes have no errno; a lost connection is a reset; an abort is ECONNABORTED; an OS error its name.
        """
        self.assertEqual(close_reason(None), ("success", ""))
        self.assertEqual(close_reason(Failure(ConnectionDone())), ("success", ""))
        self.assertEqual(close_reason(Failure(ConnectionLost())), ("failure", "ECONNRESET"))
        self.assertEqual(close_reason(Failure(ConnectionAborted())), ("failure", "ECONNABORTED"))
        self.assertEqual(close_reason(Failure(OSError(errno.EPIPE, "broken pipe"))), ("failure", "EPIPE"))
        self.assertEqual(close_reason(Failure(ValueError())), ("failure", "UNKNOWN"))

    def test_error_label(self):
        """
        A proxy error's label is its class in snake case.
        """
        self.assertEqual(error_label(NoEndpoints("x")), "no_endpoints")
        self.assertEqual(error_label(ResponseTimeout("x")), "response_timeout")


class FamilyTests(SynchronousTestCase):
    """
    The families the metrics registry adds for Linkerd's tooling.
    """

    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(process=False, clock=self.clock.seconds)
        self.get = self.metrics.registry.get_sample_value

    def test_http_labels(self):
        """
        Outbound HTTP metrics carry the hop's TLS labels and the endpoint's dst_* labels.
        """
        bundle = self.metrics.http_route("outbound", "web:80", "10.0.0.1:80", "true", "", "web.ns",
                                         dst=(("dst_pod", "web-0"),))
        bundle.requests.inc()
        self.assertEqual(self.get("request_total", dict(direction="outbound", authority="web:80",
                                                        target_addr="10.0.0.1:80", tls="true", server_id="web.ns",
                                                        dst_pod="web-0")), 1)

    def test_tcp_close(self):
        """
        A close counts with its classification and errno, and its lifetime in C{tcp_connection_duration_ms}.
        """
        tcp = self.metrics.tcp("inbound", "src", "no_identity", "127.0.0.1:8080",
                               no_tls_reason="not_provided_by_remote")
        started = tcp.opened()
        self.clock.advance(0.25)
        tcp.closed(started=started, reason=Failure(ConnectionLost()), read=7, written=9)
        labels = dict(direction="inbound", peer="src", target_addr="127.0.0.1:8080", tls="no_identity",
                      no_tls_reason="not_provided_by_remote")
        eos = dict(labels, classification="failure", errno="ECONNRESET")
        self.assertEqual(self.get("tcp_close_total", eos), 1)
        self.assertEqual(self.get("tcp_open_connections", labels), 0)
        self.assertEqual(self.get("tcp_read_bytes_total", labels), 7)
        self.assertEqual(self.get("tcp_write_bytes_total", labels), 9)
        self.assertEqual(self.get("tcp_connection_duration_ms_bucket", dict(eos, le="200.0")), 0)
        self.assertEqual(self.get("tcp_connection_duration_ms_bucket", dict(eos, le="300.0")), 1)

    def test_tcp_bounded(self):
        """
        Past the bound, new TCP label sets share an overflow one.
        """
        for i in range(1000):
            self.metrics.tcp("outbound", "src", "no_identity", f"10.0.0.1:{i + 1}", authority=f"a{i}:1")
        late = self.metrics.tcp("outbound", "src", "no_identity", "10.0.0.2:1", authority="late:1")
        self.assertIs(late, self.metrics.tcp("outbound", "src", "no_identity", "10.0.0.3:1", authority="later:1"))
        self.assertIn(("target_addr", "overflow"), late.labels)

    def test_connection(self):
        """
        A L{TcpConnection} counts under the labels it is bound to, or its default when it closes unbound, or
        not at all once skipped.
        """
        bound, default = (self.metrics.tcp("outbound", "src", "no_identity", addr, no_tls_reason="loopback")
                          for addr in ("127.0.0.1:4140", ""))
        conn = TcpConnection(default)
        conn.rx += 10
        conn.bind(bound)
        conn.tx += 20
        conn.closed(None)
        conn.closed(None)
        self.assertEqual(self.get("tcp_read_bytes_total", dict(_labels(bound))), 10)
        self.assertEqual(self.get("tcp_write_bytes_total", dict(_labels(bound))), 20)
        self.assertEqual(self.get("tcp_close_total", dict(_labels(bound), classification="success", errno="")), 1)
        unbound = TcpConnection(default)
        unbound.closed(Failure(ConnectionLost()))
        self.assertEqual(self.get("tcp_open_total", dict(_labels(default))), 1)
        skipped = TcpConnection(default)
        skipped.skip()
        skipped.closed(None)
        self.assertEqual(self.get("tcp_open_total", dict(_labels(default))), 1)

    def test_http_errors_and_build_info(self):
        """
        Proxy errors count by direction and kind; the build info is there.
        """
        self.metrics.http_error("outbound", NoEndpoints("none"))
        self.metrics.http_error("outbound", NoEndpoints("none"))
        self.assertEqual(self.get("outbound_http_errors_total", {"error": "no_endpoints"}), 2)
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn('proxy_build_info{git_sha="",profile="release",vendor="linkproxy",version="', text)

    def test_route_tls(self):
        """
        Route metrics have C{tls} when given (inbound) and none otherwise (outbound).
        """
        self.metrics.route("inbound", "web:80", "r", "true").requests.inc()
        self.metrics.route("outbound", "web:80", "r").requests.inc()
        self.assertEqual(self.get("route_request_total", dict(direction="inbound", authority="web:80",
                                                              dst="web:80", rt_route="r", tls="true")), 1)
        self.assertEqual(self.get("route_request_total", dict(direction="outbound", authority="web:80",
                                                              dst="web:80", rt_route="r")), 1)


def _labels(bundle):
    return bundle.labels


class SniffedConnectionTests(SynchronousTestCase):
    """
    The sniffer counts the TCP metrics of the connections it hands on, and the detection latency.
    """

    def test_counts_reads_and_close(self):
        """
        Every byte read (before and after the decision) counts under the labels bound at detection; the close
        counts when the connection goes; the time to the decision is observed.
        """
        clock = Clock()
        metrics = Metrics(process=False, clock=clock.seconds)
        bundle = metrics.tcp("outbound", "src", "no_identity", "127.0.0.1:4140", no_tls_reason="loopback")
        conn = TcpConnection(None)
        received = []

        class Sink(protocol.Protocol):
            def dataReceived(self, data):
                received.append(data)

        def on_detected(detection, transport):
            self.assertEqual(detection.protocol, Detected.HTTP1)
            conn.bind(bundle)
            return Sink()

        sniffer = SniffingProtocol(on_detected, reactor=clock, timeout=10, metrics=metrics, direction="outbound",
                                   tcp=conn)
        sniffer.makeConnection(StringTransport())
        clock.advance(0.002)
        sniffer.dataReceived(b"GET / HTTP/1.1\r\n")
        sniffer.dataReceived(b"Host: a\r\n\r\n")
        sniffer.connectionLost(Failure(ConnectionDone()))
        get = metrics.registry.get_sample_value
        labels = dict(bundle.labels)
        self.assertEqual(get("tcp_read_bytes_total", labels), 27)
        self.assertEqual(get("tcp_close_total", dict(labels, classification="success", errno="")), 1)
        self.assertEqual(get("protocol_detect_duration_ms_bucket", dict(direction="outbound", protocol="http1",
                                                                        le="1.0")), 0)
        self.assertEqual(get("protocol_detect_duration_ms_bucket", dict(direction="outbound", protocol="http1",
                                                                        le="5.0")), 1)


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Client(protocol.Protocol):
    def __init__(self):
        self.got = b""
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"hello")

    def dataReceived(self, data):
        self.got += data
        if self.got == b"hello":
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost.callback(None)


class MeteredConnectorTests(TestCase):
    """
    HTTP client connections count in the TCP metrics (peer="dst"), with the kernel's byte counts at close.
    """

    @defer.inlineCallbacks
    def test_counts_connection(self):
        """
        A connection through L{MeteredConnector} opens, closes and counts the bytes it moved.
        """
        factory = protocol.Factory.forProtocol(_Echo)
        port = yield TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        metrics = Metrics(process=False)
        endpoint = Endpoint(address=("127.0.0.1", port.getHost().port), labels={"pod": "web-0"})
        connector = MeteredConnector(Connector(global_reactor, 5.0), metrics, "outbound")
        client = _Client()
        yield connector.connect(endpoint, client, "http1")
        yield client.lost
        labels = dict(direction="outbound", peer="dst", target_addr=endpoint.addr_str, tls="no_identity",
                      no_tls_reason="not_provided_by_service_discovery", dst_pod="web-0")
        get = metrics.registry.get_sample_value
        self.assertEqual(get("tcp_open_total", labels), 1)
        self.assertEqual(get("tcp_open_connections", labels), 0)
        self.assertEqual(get("tcp_close_total", dict(labels, classification="success", errno="")), 1)
        self.assertEqual(get("tcp_write_bytes_total", labels), 5)
        self.assertEqual(get("tcp_read_bytes_total", labels), 5)
