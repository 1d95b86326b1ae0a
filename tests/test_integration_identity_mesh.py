"""
Two real proxies certified by a real identity service: no proxy directory holds an issuer key, requests
carry the verified l5d-client-id, ten-second certificates renew under load without a failed request, and an
outage of the service is survived until the certificates it signed expire.
"""

import json
import os
import shutil
import threading
import time

from twisted.trial.unittest import TestCase

from tests.identity_support import IdentityService, identity_cli
from tests.proc import TcpServer, http_get, wait_for
from tests.test_integration_mesh import CLIENT, Mesh, echo_client_id

LIFETIME = 10.0


class _Load:
    """
    Requests through the mesh from two threads until stopped, checking each answer and /ready of both
    proxies as it goes.
    """

    def __init__(self, mesh):
        self.mesh = mesh
        self.failures = []
        self.not_ready = []
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]
        self._threads.append(threading.Thread(target=self._watch_ready, daemon=True))
        for thread in self._threads:
            thread.start()

    def _run(self):
        expected = b"client-id=" + CLIENT.encode()
        while not self._stop.is_set():
            try:
                status, _, body = self.mesh.get(timeout=5)
                result = None if (status, body) == (200, expected) else (status, body)
            except OSError as e:
                result = repr(e)
            with self._lock:
                self.count += 1
                if result is not None:
                    self.failures.append(result)

    def _watch_ready(self):
        while not self._stop.is_set():
            for proxy in (self.mesh.a, self.mesh.b):
                status, _, body = http_get(proxy.url("admin", "/ready"), timeout=5)
                if status != 200:
                    self.not_ready.append(body)
            time.sleep(0.2)

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


class IdentityServiceMeshTests(TestCase):
    """
    Proxy A (CLIENT) calls the app behind proxy B (WEB); both get their certificates from the service.
    """

    def test_certified_mesh_renews_and_survives_an_outage(self):
        """
        The mesh works with certificates from the service alone, and renews them under load with no failed
        request. With the service stopped for longer than a renewal, requests keep succeeding and /ready
        stays 200 while the old certificates are valid; once they expire /ready says so, and when the
        service comes back both proxies are certified again.
        """
        domain = os.path.abspath(self.mktemp())
        identity_cli("init", domain)
        # What the Kubernetes Secret holds: the anchors and the issuer, never the root key.
        service_dir = os.path.abspath(self.mktemp())
        os.makedirs(service_dir)
        for name in ("ca.pem", "issuer.pem", "issuer-key.pem"):
            shutil.copy(os.path.join(domain, name), service_dir)
        tokens = os.path.abspath(self.mktemp() + ".yaml")
        with open(tokens, "w") as f:
            json.dump({"token-a": "system:serviceaccount:default:client",
                       "token-b": "system:serviceaccount:default:web"}, f)
        service = IdentityService(self, service_dir, "--token-review", f"file:{tokens}",
                                  "--lifetime", f"{LIFETIME:g}s")

        dirs, settings = {}, {}
        for side, token in (("a", "token-a"), ("b", "token-b")):
            dirs[side] = os.path.abspath(self.mktemp())
            os.makedirs(dirs[side])
            shutil.copy(os.path.join(domain, "ca.pem"), dirs[side])
            token_file = os.path.abspath(self.mktemp() + ".token")
            with open(token_file, "w") as f:
                f.write(token + "\n")
            settings[side] = {"identity_service": service.address, "identity_token_file": token_file}
        app = TcpServer(self, echo_client_id)
        mesh = Mesh(self, app.port, b_dir=dirs["b"], b_config=settings["b"], a_dir=dirs["a"],
                    a_config=settings["a"])

        # Renewal under load.
        load = _Load(mesh)
        try:
            wait_for(lambda: all(p.metric("identity_cert_refreshes_total") >= 2 for p in (mesh.a, mesh.b)),
                     timeout=LIFETIME + 5, interval=0.2, what="both proxies to renew their certificates")
            time.sleep(0.5)
        finally:
            load.stop()
        self.assertEqual(load.failures, [])
        self.assertEqual(load.not_ready, [])
        self.assertGreater(load.count, 20)
        for side in dirs:
            self.assertEqual(os.listdir(dirs[side]), ["ca.pem"])
        self.assertGreaterEqual(service.metric("identity_certified_total"), 4)

        # The service goes away for longer than a renewal.
        service.stop()
        expiries = [p.metric("identity_cert_expiration_timestamp_seconds") for p in (mesh.a, mesh.b)]
        load = _Load(mesh)
        try:
            wait_for(lambda: time.time() > min(expiries) - 1.0, timeout=LIFETIME + 2, interval=0.1,
                     what="the certificates to near their expiry")
        finally:
            load.stop()
        self.assertEqual(load.failures, [])
        self.assertEqual(load.not_ready, [])
        self.assertGreater(load.count, 10)
        # Each proxy that has passed its renewal point (70 % of the lifetime) tried and failed; the one whose
        # certificate expires first always has.
        renewal_points = [expiry - 0.3 * LIFETIME for expiry in expiries]
        for proxy, point in zip((mesh.a, mesh.b), renewal_points):
            if point < time.time() - 0.5:
                self.assertGreaterEqual(proxy.metric("identity_cert_refresh_failures_total"), 1)
        self.assertLess(min(renewal_points), time.time() - 0.5)

        def expired(proxy):
            status, _, body = http_get(proxy.url("admin", "/ready"))
            return status == 503 and b"expired" in body
        wait_for(lambda: expired(mesh.a) and expired(mesh.b), timeout=5, what="/ready to report the expiry")

        # And comes back: the proxies retry until they are certified again.
        service.start()

        def ready(proxy):
            return http_get(proxy.url("admin", "/ready"))[0] == 200
        wait_for(lambda: ready(mesh.a) and ready(mesh.b), timeout=10, interval=0.2,
                 what="both proxies to be certified again")
        status, _, body = mesh.get()
        self.assertEqual((status, body), (200, b"client-id=" + CLIENT.encode()))
