"""
Two real C{twist linkproxy} processes meshed with mTLS: proxy A (the client's side) reaches the service through
proxy B (the app's side). The app sees the verified client identity, both sides label the hop tls="true", and
every way of failing the handshake or the policy is refused and counted.
"""

import datetime
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time

import yaml
from twisted.trial.unittest import SkipTest, TestCase

from tests.proc import Proxy, TcpServer, free_port, http_get, recv_exactly, wait_for
from tests.test_integration_http import GrpcServer, grpc, grpc_calls

TRUST_DOMAIN = "linkproxy.local"
CLIENT = f"client.default.serviceaccount.identity.{TRUST_DOMAIN}"
WEB = f"web.default.serviceaccount.identity.{TRUST_DOMAIN}"


def identity_cli(*args):
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "linkproxy-identity"), *args],
                         capture_output=True, timeout=30)
    if out.returncode != 0:
        raise AssertionError(f"linkproxy-identity {' '.join(args)} failed: {out.stderr.decode()}")
    return out.stdout.decode()


def trust_domain(testcase):
    """
    A fresh dev trust domain (anchor + issuer), made with the linkproxy-identity CLI.
    """
    directory = os.path.abspath(testcase.mktemp())
    identity_cli("init", directory)
    return directory


def echo_client_id(conn):
    """
    An app that answers each HTTP/1 request with the l5d-client-id it was given (keep-alive).
    """
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        client_id = b"none"
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"l5d-client-id":
                client_id = value.strip()
        body = b"client-id=" + client_id
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


class Mesh:
    """
    Proxy B in front of C{app_port} with identity WEB, and proxy A whose endpoints file sends web.default:80
    (and web.default:9000 for opaque TCP) to B.
    """

    def __init__(self, testcase, app_port, *, b_dir=None, b_config=None, a_dir=None, server_identity=WEB,
                 b_inbound=None, a_config=None):
        domain = trust_domain(testcase)
        self.domain = domain
        self.b = None
        if b_inbound is None:
            self.b = Proxy(testcase, {"app": f"tcp:host=127.0.0.1:port={app_port}",
                                      "identity_dir": b_dir or domain, "identity_name": WEB,
                                      **(b_config or {})})
            b_inbound = self.b.ports["inbound"]
        self.endpoints = os.path.abspath(testcase.mktemp() + ".yaml")
        entry = {"addr": f"127.0.0.1:{app_port}", "identity": server_identity, "proxy": f"127.0.0.1:{b_inbound}"}
        with open(self.endpoints, "w") as f:
            yaml.safe_dump({"services": {"web.default:80": [entry],
                                         "web.default:9000": [dict(entry, addr=f"127.0.0.1:{app_port}")]}}, f)
        self.tcp_route = free_port()
        self.a = Proxy(testcase, {"identity_dir": a_dir or domain, "identity_name": CLIENT,
                                  "discovery": f"file:{self.endpoints}",
                                  "tcp_routes": f"tcp:{self.tcp_route}:interface=127.0.0.1->web.default:9000",
                                  **(a_config or {})})

    def get(self, path="/", timeout=10):
        return http_get(self.a.url("outbound", path), headers={"Host": "web.default"}, timeout=timeout)


class MeshTests(TestCase):
    """
    The happy path through two proxies.
    """

    def test_client_identity_reaches_app(self):
        """
        The app sees l5d-client-id with A's identity; B counts the request with tls="true" and the client id;
        A counts it with tls="true" and B's identity as server_id.
        """
        app = TcpServer(self, echo_client_id)
        mesh = Mesh(self, app.port)
        status, _, body = mesh.get()
        self.assertEqual((status, body), (200, b"client-id=" + CLIENT.encode()))
        self.assertEqual(mesh.b.metric("request_total", direction="inbound", tls="true", client_id=CLIENT), 1)
        self.assertEqual(mesh.a.metric("request_total", direction="outbound", tls="true", server_id=WEB), 1)
        self.assertIsNotNone(mesh.b.metric("identity_cert_expiration_timestamp_seconds"))

    def test_spoofed_client_id_is_replaced(self):
        """
        A client cannot claim an identity: the header it sends is replaced by the verified one.
        """
        app = TcpServer(self, echo_client_id)
        mesh = Mesh(self, app.port)
        status, _, body = http_get(mesh.a.url("outbound", "/"), headers={"Host": "web.default",
                                                                          "l5d-client-id": "admin"})
        self.assertEqual(body, b"client-id=" + CLIENT.encode())

    def test_opaque_tcp_through_mesh(self):
        """
        A TCP route to a meshed service carries opaque bytes over mTLS with the transport header naming the
        target port.
        """
        app = TcpServer(self, _echo)
        mesh = Mesh(self, app.port)
        import socket
        with socket.create_connection(("127.0.0.1", mesh.tcp_route), timeout=10) as s:
            s.sendall(b"\x00opaque bytes")
            self.assertEqual(recv_exactly(s, 13), b"\x00opaque bytes")
        wait_for(lambda: mesh.b.metric("tcp_open_total", direction="inbound", peer="src", tls="true"),
                 what="B to count the meshed TCP connection")

    def test_grpc_through_both_proxies(self):
        """
        grpcio unary, streaming both ways, through A and B over mTLS.
        """
        if grpc is None:
            raise SkipTest("grpcio is not installed")
        server = GrpcServer(self)
        mesh = Mesh(self, server.port)
        with open(mesh.endpoints) as f:
            doc = yaml.safe_load(f)
        doc["services"]["grpc.default:80"] = [dict(doc["services"]["web.default:80"][0],
                                                   addr=f"127.0.0.1:{server.port}")]
        with open(mesh.endpoints + ".tmp", "w") as f:
            yaml.safe_dump(doc, f)
        os.replace(mesh.endpoints + ".tmp", mesh.endpoints)
        time.sleep(1.5)  # the file is polled every second
        channel = grpc.insecure_channel(f"127.0.0.1:{mesh.a.ports['outbound']}",
                                        options=[("grpc.default_authority", "grpc.default:80")])
        self.addCleanup(channel.close)
        grpc_calls(self, channel)
        self.assertEqual(mesh.b.metric("response_total", direction="inbound", tls="true", grpc_status="0"), 3)

    def test_rotation_under_load(self):
        """
        B's certificate files are replaced while requests flow through the mesh: no request fails, and B
        reloads its identity.
        """
        app = TcpServer(self, echo_client_id)
        domain = trust_domain(self)
        b_dir = os.path.abspath(self.mktemp())
        os.makedirs(b_dir)
        shutil.copy(os.path.join(domain, "ca.pem"), b_dir)

        def issue_into_b():
            identity_cli("issue", domain, WEB)
            for name in ("key.pem", "cert.pem"):
                shutil.copy(os.path.join(domain, name), os.path.join(b_dir, name + ".tmp"))
            os.replace(os.path.join(b_dir, "key.pem.tmp"), os.path.join(b_dir, "key.pem"))
            os.replace(os.path.join(b_dir, "cert.pem.tmp"), os.path.join(b_dir, "cert.pem"))

        issue_into_b()
        mesh = Mesh(self, app.port, b_dir=b_dir, a_dir=domain)
        before = mesh.b.metric("identity_cert_refresh_total")
        failures, done, count = [], threading.Event(), [0]

        def load():
            deadline = time.monotonic() + 12
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    status, _, _ = mesh.get(timeout=5)
                    if status != 200:
                        failures.append(status)
                except OSError as e:
                    failures.append(repr(e))
                count[0] += 1
        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1)
        issue_into_b()
        try:
            wait_for(lambda: mesh.b.metric("identity_cert_refresh_total") > before, timeout=10,
                     what="B to reload its rotated certificate")
            time.sleep(1)
        finally:
            done.set()
            for t in threads:
                t.join(15)
        self.assertEqual(failures, [])
        self.assertGreater(count[0], 20)
        status, _, _ = mesh.get()
        self.assertEqual(status, 200)


ALPN = "transport.l5d.io/v1"


class AlpnTests(TestCase):
    """
    ALPN C{transport.l5d.io/v1} between two real proxies, and against C{openssl s_client}, a client this project
    did not write.
    """

    def test_negotiated_between_two_proxies(self):
        """
        A offers C{transport.l5d.io/v1}, B selects it, A writes the transport header and B reads it (both say so
        in their debug logs), and requests flow: HTTP/1 (session protocol http1) and opaque TCP (none), each to
        the target port the header names.
        """
        app = TcpServer(self, echo_client_id)
        echo = TcpServer(self, _echo)
        debug = {"log_level": "debug"}
        mesh = Mesh(self, app.port, b_config=debug, a_config=debug)
        with open(mesh.endpoints) as f:
            doc = yaml.safe_load(f)
        doc["services"]["web.default:9000"][0]["addr"] = f"127.0.0.1:{echo.port}"
        with open(mesh.endpoints + ".tmp", "w") as f:
            yaml.safe_dump(doc, f)
        os.replace(mesh.endpoints + ".tmp", mesh.endpoints)
        time.sleep(1.5)  # the file is polled every second
        status, _, body = mesh.get()
        self.assertEqual((status, body), (200, b"client-id=" + CLIENT.encode()))
        import socket
        with socket.create_connection(("127.0.0.1", mesh.tcp_route), timeout=10) as s:
            s.sendall(b"opaque")
            self.assertEqual(recv_exactly(s, 6), b"opaque")

        b_inbound = mesh.b.ports["inbound"]
        wait_for(lambda: mesh.a.log().count(f"mTLS to {WEB} at 127.0.0.1:{b_inbound}: ALPN {ALPN}, "
                                            f"transport header sent") == 2,
                 what="A to log two connections with the ALPN negotiated")
        wait_for(lambda: mesh.b.log().count(f"mTLS from {CLIENT}: ALPN {ALPN}") == 2,
                 what="B to log two connections with the ALPN negotiated")
        log = mesh.b.log()
        self.assertIn(f"transport header from {CLIENT}: "
                      f"TransportHeader(port={app.port}, name='', session_protocol='http1')", log)
        self.assertIn(f"transport header from {CLIENT}: "
                      f"TransportHeader(port={echo.port}, name='', session_protocol=None)", log)
        self.assertNotIn("ALPN none", log + mesh.a.log())
        self.assertIsNone(mesh.b.metric("tcp_protocol_error_total", protocol="transport_header"))

    def s_client(self, port, own, data, alpn=ALPN, until=b"client-id="):
        """
        Run C{openssl s_client} against B's inbound port with the client certificate in C{own}, send C{data},
        and return its output once it contains C{until} (or once it ends).
        """
        path = lambda name: os.path.join(own, name)  # noqa: E731
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", WEB, "-verify_hostname",
                WEB, "-verify_return_error", "-tls1_3", "-cert", path("cert.pem"), "-cert_chain", path("cert.pem"),
                "-key", path("key.pem"), "-CAfile", path("ca.pem"), "-ign_eof"]
        if alpn:
            argv += ["-alpn", alpn]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.kill)
        out = bytearray()
        reader = threading.Thread(target=lambda: [out.extend(chunk) for chunk in iter(
            lambda: proc.stdout.read1(65536), b"")], daemon=True)
        reader.start()
        proc.stdin.write(data)
        proc.stdin.close()
        wait_for(lambda: until in out or proc.poll() is not None, timeout=15, what=f"openssl to print {until!r}")
        proc.kill()
        reader.join(5)
        return bytes(out)

    def test_s_client(self):
        """
        openssl s_client offering C{transport.l5d.io/v1} gets it selected by a real proxy, whose inbound side
        then reads the header it sends and answers the request after it. Without the header, the same client is
        refused and counted as C{error="missing"}; without the ALPN, a header is still read (a linkproxy
        from before the ALPN).
        """
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        app = TcpServer(self, echo_client_id)
        domain = trust_domain(self)
        b = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={app.port}", "identity_dir": domain,
                         "identity_name": WEB})
        port = b.ports["inbound"]
        tester = f"tester.default.serviceaccount.identity.{TRUST_DOMAIN}"
        # s_client's certificate in a directory of its own: the proxy's identity directory must hold no leaf.
        own = os.path.abspath(self.mktemp())
        shutil.copytree(domain, own)
        identity_cli("issue", own, tester)
        tester = tester.encode()
        request = b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        from linkproxy.core import transport_header
        header = transport_header.encode(app.port, session_protocol="http1")

        out = self.s_client(port, own, header + request)
        self.assertIn(f"ALPN protocol: {ALPN}".encode(), out)
        self.assertIn(b"client-id=" + tester, out)

        accepted = app.accepted
        out = self.s_client(port, own, request, until=b"\nclosed")
        self.assertIn(f"ALPN protocol: {ALPN}".encode(), out)
        self.assertNotIn(b"HTTP/1.1 200", out)
        wait_for(lambda: b.metric("tcp_protocol_error_total", direction="inbound", protocol="transport_header",
                                  error="missing") == 1,
                 what="B to count the missing transport header")
        self.assertEqual(app.accepted, accepted)

        out = self.s_client(port, own, header + request, alpn=None)
        self.assertIn(b"No ALPN negotiated", out)
        self.assertIn(b"client-id=" + tester, out)


class RefusalTests(TestCase):
    """
    Each way the mesh can be wrong is refused, and counted.
    """

    def test_wrong_server_identity(self):
        """
        A peer that presents a valid certificate of the trust domain, but for another identity than discovery
        promised (an impostor, or a misrouted endpoint): A refuses it at the handshake, answers 502 with
        l5d-proxy-error, and counts the refusal; no request is sent to it.
        """
        domain = trust_domain(self)
        identity_cli("issue", domain, WEB)
        impostor = _tls_server(self, os.path.join(domain, "cert.pem"), os.path.join(domain, "key.pem"))
        app = TcpServer(self, echo_client_id)
        mesh = Mesh(self, app.port, b_inbound=impostor, a_dir=domain,
                    server_identity=f"other.default.serviceaccount.identity.{TRUST_DOMAIN}")
        status, headers, _ = mesh.get()
        self.assertEqual(status, 502)
        self.assertIn("l5d-proxy-error", {k.lower() for k in headers})
        self.assertGreaterEqual(mesh.a.metric("tcp_protocol_error_total", direction="outbound", protocol="tls",
                                              error="identity_mismatch"), 1)
        self.assertEqual(app.accepted, 0)

    def test_untrusted_ca(self):
        """
        Proxy B from another trust domain (same names): neither side trusts the other; A answers 502 and B
        counts a refused handshake.
        """
        app = TcpServer(self, echo_client_id)
        other = trust_domain(self)
        mesh = Mesh(self, app.port, b_dir=other)
        status, headers, _ = mesh.get()
        self.assertIn(status, (502, 503))
        self.assertIn("l5d-proxy-error", {k.lower() for k in headers})
        wait_for(lambda: mesh.b.metric("tcp_protocol_error_total", direction="inbound", protocol="tls"),
                 what="B to count the refused handshake")
        self.assertEqual(app.accepted, 0)

    def test_expired_certificate(self):
        """
        A peer proxy presenting an expired certificate (signed by the right CA) is refused by A: 502, counted.
        """
        from linkproxy.identity import ca
        domain = trust_domain(self)
        issuer_cert, issuer_key = ca.load_issuer(domain)
        key = ca.new_key()
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
        leaf = ca.make_leaf(issuer_cert, issuer_key, WEB, key, past, datetime.timedelta(days=1))
        from cryptography.hazmat.primitives import serialization
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        with open(os.path.join(d, "cert.pem"), "wb") as f:
            f.write(leaf.public_bytes(serialization.Encoding.PEM)
                    + issuer_cert.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(d, "key.pem"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        port = _tls_server(self, os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
        app = TcpServer(self, echo_client_id)
        mesh = Mesh(self, app.port, b_inbound=port, a_dir=domain)
        status, headers, _ = mesh.get()
        self.assertEqual(status, 502)
        self.assertIn("l5d-proxy-error", {k.lower() for k in headers})
        errors = {labels["error"] for labels in mesh.a.samples("tcp_protocol_error_total", direction="outbound")}
        # The peer's chain is refused at verification, not for trust: the same anchor signed it.
        self.assertTrue(errors & {"cert_expired", "cert_invalid"}, errors)
        self.assertNotIn("untrusted", errors)
        self.assertEqual(app.accepted, 0)

    def test_no_client_certificate_under_authenticated(self):
        """
        Under --policy authenticated, a TLS client with B's SNI but no certificate is refused at the
        handshake and counted.
        """
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        app = TcpServer(self, echo_client_id)
        domain = trust_domain(self)
        b = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={app.port}", "identity_dir": domain,
                         "identity_name": WEB, "policy": "authenticated"})
        subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{b.ports['inbound']}",
                        "-servername", WEB, "-CAfile", os.path.join(domain, "ca.pem")],
                       input=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", capture_output=True, timeout=20)
        wait_for(lambda: b.metric("tcp_protocol_error_total", direction="inbound", protocol="tls"),
                 what="B to count the handshake without a client certificate")
        self.assertEqual(app.accepted, 0)

    def test_plaintext_under_authenticated(self):
        """
        Under --policy authenticated, a plaintext HTTP request gets 403 with l5d-proxy-error and is counted.
        """
        app = TcpServer(self, echo_client_id)
        domain = trust_domain(self)
        b = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={app.port}", "identity_dir": domain,
                         "identity_name": WEB, "policy": "authenticated"})
        status, headers, _ = http_get(b.url("inbound", "/"))
        self.assertEqual(status, 403)
        self.assertIn("l5d-proxy-error", {k.lower() for k in headers})
        self.assertEqual(b.metric("inbound_http_authz_deny_total", tls="no_identity"), 1)
        self.assertEqual(app.accepted, 0)


def _echo(conn):
    data = conn.recv(65536)
    while data:
        conn.sendall(data)
        data = conn.recv(65536)


def _tls_server(testcase, cert, key):
    """
    A TLS server on 127.0.0.1 presenting C{cert}: stands in for a peer proxy with an expired certificate.
    """
    import socket
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join(5)
        sock.close()
    testcase.addCleanup(close)
    return sock.getsockname()[1]
