"""
What the identity tests share: the project's C{identity.proto} compiled by grpcio-tools (once per process,
into a temporary directory), and a real C{linkproxy-identity serve} process on loopback ports.
"""

import importlib
import importlib.resources
import os
import shutil
import subprocess
import sys
import tempfile

from tests.proc import ROOT, free_port, http_get, wait_for

IDENTITY_CLI = os.path.join(os.path.dirname(sys.executable), "linkproxy-identity")
PROTO_DIR = os.path.join(ROOT, "linkproxy", "identity")

_compiled = {}


def compiled_proto():
    """
    Compile C{linkproxy/identity/identity.proto} with grpcio-tools and import the result.

    @return: C{(identity_pb2, identity_pb2_grpc)}, or C{None} when grpcio-tools is not installed.
    """
    if "modules" in _compiled:
        return _compiled["modules"]
    try:
        from grpc_tools import protoc
    except ImportError:
        _compiled["modules"] = None
        return None
    out = tempfile.mkdtemp(prefix="linkproxy-identity-proto-")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", "identity.proto"])
    if code != 0:
        raise AssertionError(f"protoc failed to compile identity.proto (exit {code})")
    sys.path.insert(0, out)
    try:
        pb2 = importlib.import_module("identity_pb2")
        pb2_grpc = importlib.import_module("identity_pb2_grpc")
    finally:
        sys.path.remove(out)
        shutil.rmtree(out, ignore_errors=True)
    _compiled["modules"] = (pb2, pb2_grpc)
    return _compiled["modules"]


def identity_cli(*args):
    """Run C{linkproxy-identity} and return its output, or fail."""
    out = subprocess.run([IDENTITY_CLI, *args], capture_output=True, timeout=30)
    if out.returncode != 0:
        raise AssertionError(f"linkproxy-identity {' '.join(args)} failed: {out.stderr.decode()}")
    return out.stdout.decode()


def service_name(trust_domain="linkproxy.local", namespace="linkproxy"):
    return f"identity.{namespace}.serviceaccount.identity.{trust_domain}"


class IdentityService:
    """
    A C{linkproxy-identity serve DIR} process on loopback ports, stopped at cleanup.

    @ivar port: the gRPC (TLS) port.
    @ivar admin_port: the admin port.
    """

    def __init__(self, testcase, directory, *args, port=None, env=None, ready=True):
        self.testcase = testcase
        self.directory = directory
        self.args = args
        self.port = port or free_port()
        self.admin_port = free_port()
        self.env = env
        self.log_path = os.path.abspath(testcase.mktemp() + ".log")
        self.process = None
        self.start(ready)
        testcase.addCleanup(self.stop)

    def start(self, ready=True):
        """Start (or restart) the process on the same ports."""
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("LINKPROXY_", "KUBERNETES_")) and k != "KUBECONFIG"}
        full_env["PYTHONPATH"] = ROOT
        full_env.update(self.env or {})
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [IDENTITY_CLI, "serve", self.directory, "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--admin", f"tcp:{self.admin_port}:interface=127.0.0.1", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        if ready:
            self.wait_ready()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def url(self, path):
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def wait_ready(self, timeout=15.0):
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"linkproxy-identity serve exited with {self.process.returncode}:\n"
                                     f"{self.log()}")
            try:
                return http_get(self.url("/ready"), timeout=1)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, what="linkproxy-identity serve /ready")

    def metric(self, name, **labels):
        """One sample of C{/metrics}, summed over the samples whose labels include C{labels}, or C{None}."""
        from prometheus_client.parser import text_string_to_metric_families
        total = None
        text = http_get(self.url("/metrics"))[2].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total = (total or 0) + sample.value
        return total

    def stop(self, timeout=10.0):
        """SIGTERM, then wait; killed if it will not go. @return: the exit status."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._log.close()
            return self.process.returncode
        return None
