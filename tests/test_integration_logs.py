"""
The log and the admin server's safety through a real C{twist linkproxy}: what a process manager or a container
runtime (stdout not a terminal) gets to read, and what a client on another host may do on the admin port.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.proc import ROOT, TWIST, HttpBackend, Proxy, free_port, http1_requests, http_get, wait_for, \
    write_atomically
from tests.test_integration_balancing import SERVICE, endpoints_yaml

# A plain line: time, level, namespace, message (and key=value fields).
PLAIN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (DEBUG|INFO |WARN |ERROR|CRITICAL) \S+: .*$")


def _run_to_pipe(testcase, *args):
    """
    Run C{twist linkproxy ARGS} with stdout and stderr on a pipe (not a terminal), as a process manager does,
    with no twist option before the plugin name; wait until it is ready, stop it with SIGTERM.

    @return: its output, as text.
    """
    ports = {name: free_port() for name in ("outbound", "inbound", "admin")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKPROXY_")}
    env["PYTHONPATH"] = ROOT
    process = subprocess.Popen(
        [TWIST, "linkproxy", *(f"--{name}=tcp:{port}:interface=127.0.0.1" for name, port in ports.items()),
         "--discovery", "static:web.test:80=127.0.0.1:9", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def cleanup():
        if process.poll() is None:
            process.kill()
            process.communicate()
    testcase.addCleanup(cleanup)

    def ready():
        if process.poll() is not None:
            raise AssertionError(f"linkproxy exited with {process.returncode}:\n{process.stdout.read()!r}")
        try:
            return http_get(f"http://127.0.0.1:{ports['admin']}/ready", timeout=1)[0] == 200
        except OSError:
            return False
    wait_for(ready, 15, what="linkproxy /ready")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    return output.decode("utf-8")


class LogFormatTests(TestCase):
    """
    C{--log-format} decides what a non-terminal stdout gets, for linkproxy's events and Twisted's alike.
    """

    def test_plain_by_default_on_a_pipe(self):
        """
        With stdout a pipe and no format asked for, every line is a plain line (time, level, namespace,
        message), Twisted's own included, and none is twist's JSON event dump.
        """
        output = _run_to_pipe(self)
        lines = output.splitlines()
        self.assertTrue(lines, output)
        for line in lines:
            self.assertRegex(line, PLAIN)
        self.assertNotIn("log_flattened", output)
        self.assertNotIn("__class_uuid__", output)
        self.assertTrue(any(" INFO  linkproxy.service: admin listening on 127.0.0.1:" in line for line in lines),
                        output)
        self.assertTrue(any(" INFO  twisted.internet.base: Received SIGTERM, shutting down." in line
                            for line in lines), output)

    def test_json_every_line_loads(self):
        """
        With C{--log-format json} every line is one JSON object with C{timestamp, level, target, message,
        fields}; Twisted's messages are among them, and the drain is logged at its start and its end.
        """
        output = _run_to_pipe(self, "--log-format", "json")
        records = [json.loads(line) for line in output.splitlines()]
        self.assertTrue(records, output)
        for record in records:
            self.assertEqual(list(record), ["timestamp", "level", "target", "message", "fields"])
            self.assertIsInstance(record["fields"], dict)
        by_message = {r["message"]: r for r in records}
        listening = [r for r in records if r["message"].startswith("outbound listening on 127.0.0.1:")]
        self.assertEqual(len(listening), 1, output)
        self.assertEqual((listening[0]["level"], listening[0]["target"], listening[0]["fields"]["name"]),
                         ("INFO", "linkproxy.service", "outbound"))
        self.assertEqual(by_message["Received SIGTERM, shutting down."]["target"], "twisted.internet.base")
        draining = by_message["draining 0 open connections (grace period 30.0 s)"]
        self.assertEqual(draining["fields"], {"count": 0, "grace": 30.0})
        self.assertTrue(any(r["message"].startswith("drain finished after ") for r in records), output)

    def test_plugin_format_wins_over_twists(self):
        """
        C{twist --log-format text linkproxy}, as the other integration tests run it, writes plain lines, and
        C{twist --log-format json linkproxy} does too: twist's option names twist's formats, which linkproxy's
        own C{--log-format} replaces.
        """
        for twist_format in ("text", "json"):
            proxy = Proxy(self, twist_args=("--log-format", twist_format))
            proxy.stop()
            lines = proxy.log().splitlines()
            self.assertTrue(lines)
            for line in lines:
                self.assertRegex(line, PLAIN)


class EjectionLogTests(TestCase):
    """
    A dead endpoint is logged once when it is ejected, not once per request that finds it dead.
    """

    def test_ejection_logged_once(self):
        """
        With C{file:} discovery of two endpoints and the proxy logging JSON, killing one and sending requests
        for 2.5 s more after its ejection (past the probe interval of about a second, so probes to the dead
        endpoint fail again) logs exactly one C{ejected} event naming it, with a reason, and no recovery; the
        target's endpoint set is logged once, when it is first discovered.
        """
        survivor, victim = HttpBackend(self, "survivor"), HttpBackend(self, "victim")
        endpoints_path = os.path.abspath(self.mktemp() + ".endpoints.yaml")
        write_atomically(endpoints_path, endpoints_yaml({SERVICE: [survivor, victim]}))
        proxy = Proxy(self, {"discovery": f"file:{endpoints_path}", "balancer": "round-robin",
                             "log_format": "json"})
        port = proxy.ports["outbound"]
        self.assertEqual(sorted(body for _, _, body in http1_requests(port, SERVICE, 10)),
                         [b"survivor"] * 5 + [b"victim"] * 5)
        victim.kill()
        for _ in range(20):
            http1_requests(port, SERVICE, 10, threads=2)
        wait_for(lambda: (proxy.metric("outbound_http_balancer_endpoints", endpoint_state="ejected") or 0) >= 1, timeout=5,
                 interval=0.1, what="the killed endpoint to be ejected")
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            http1_requests(port, SERVICE, 5)
            time.sleep(0.05)
        proxy.stop()

        records = [json.loads(line) for line in proxy.log().splitlines()]
        ejected = [r for r in records if r["target"] == "linkproxy.routing" and r["fields"].get("event") == "ejected"]
        self.assertEqual(len(ejected), 1, proxy.log()[-4000:])
        [event] = ejected
        self.assertEqual((event["level"], event["fields"]["endpoint"], event["fields"]["target"]),
                         ("INFO", victim.address, SERVICE))
        self.assertTrue(event["fields"]["reason"])
        self.assertIn(f"endpoint {victim.address} of {SERVICE} ejected", event["message"])
        self.assertEqual([r for r in records if r["fields"].get("event") == "recovered"], [])
        discovered = [r for r in records if r["target"] == "linkproxy.discovery.cache"]
        self.assertEqual([(r["message"], r["fields"]["count"]) for r in discovered],
                         [(f"{SERVICE}: discovered 2 endpoints (file)", 2)])


def _other_local_address():
    """
    An IPv4 address of this host that is not loopback, or C{None}: the address a client on another host
    would also reach the admin server on when it listens on the pod IP.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            # No packet is sent: connecting a UDP socket only picks the outgoing interface.
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        host = s.getsockname()[0]
    if host.startswith("127.") or host == "0.0.0.0":
        return None
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return None
    return host


class AdminSafetyTests(TestCase):
    """
    The admin listener on every address, as on a pod IP: a client connecting over a non-loopback address is
    treated as another host.
    """

    def test_non_loopback_client(self):
        """
        Over a real socket from this host's non-loopback address, C{/live}, C{/ready} and C{/metrics} answer
        200, while C{PUT /proxy-log-level}, C{POST /shutdown} and C{GET /tap} answer 403 and change nothing;
        the same requests over 127.0.0.1 are obeyed.
        """
        host = _other_local_address()
        if host is None:
            raise SkipTest("this host has no non-loopback IPv4 address to connect from")
        admin_port = free_port()
        proxy = Proxy(self, {"admin": f"tcp:{admin_port}:interface=0.0.0.0"}, ready=False)
        proxy.ports["admin"] = admin_port
        proxy.wait_ready()
        remote = f"http://{host}:{admin_port}"
        for path in ("/live", "/ready", "/metrics"):
            self.assertEqual(http_get(remote + path)[0], 200, path)
        status, _, body = http_get(remote + "/proxy-log-level", method="PUT", data=b"debug")
        self.assertEqual((status, body), (403, b"/proxy-log-level is only answered for clients on this host "
                                               b"(localhost)\n"))
        self.assertEqual(http_get(remote + "/proxy-log-level")[2], b"info\n")
        self.assertEqual(http_get(remote + "/shutdown", method="POST", data=b"")[0], 403)
        self.assertEqual(http_get(remote + "/tap?limit=1")[0], 403)
        self.assertEqual(http_get(proxy.url("admin", "/ready"))[0], 200)
        self.assertEqual(http_get(proxy.url("admin", "/proxy-log-level"), method="PUT", data=b"debug")[0], 204)
        self.assertEqual(http_get(remote + "/proxy-log-level")[2], b"debug\n")
        self.assertIn(f"refused PUT /proxy-log-level from non-local client {host}", proxy.log())
