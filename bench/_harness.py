"""
Shared helpers for the linkproxy benchmarks in this directory (standard library only).

Every scenario command (tcp.py, http1.py, h2.py) runs linkproxy and its references (HAProxy from Debian, and a
direct connection to the backend) in the same run, on 127.0.0.1 only, with bounded load, and prints absolute
numbers together with ratios against HAProxy.  The machine is small and noisy: read the ratios, not the
absolute times.

What lives here:
  - ensure_tools(): installs haproxy / nginx-light / wrk / nghttp2-client with apt-get when missing;
  - Harness: a context manager owning a temp dir and every process the bench starts (tracked by PID, killed
    in `finally`, on SIGTERM/SIGHUP and at exit), plus starters for nginx, HAProxy and linkproxy;
  - /proc sampling of a process tree's CPU time (utime+stime) and RSS (VmRSS);
  - wrk and h2load runners that parse req/s and p50/p99 latency;
  - the shared measurement loop, table printer and verdict helpers;
  - A/B against a baseline checkout (--baseline DIR): a second linkproxy from DIR and its .venv, measured as
    extra targets named C{<target>@base} in the same interleaved rounds, and a current-vs-baseline table.
"""

import argparse
import atexit
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BASELINE = "@base"  # suffix of the targets a --baseline checkout serves
BASELINE_CPU_TOLERANCE = 0.05  # --baseline verdict: at most +5% CPU per request against the baseline
OUT_DIR = BENCH_DIR / "out"  # git-ignored

LOCALHOST = "127.0.0.1"
BODY = "hello from the linkproxy bench backend\n"

# binary -> Debian package that provides it
TOOL_PACKAGES = {
    "haproxy": "haproxy",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
}
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A problem that ends the bench with a clear message (no traceback)."""


class LinkproxyStartError(BenchError):
    pass


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# tools


def which(name):
    return shutil.which(name, path=_SBIN_PATH)


_compiled = set()

_COMPILE = ("import compileall, sys, sysconfig\n"
            "for path in (sysconfig.get_paths()['purelib'], *sys.argv[1:]):\n"
            "    compileall.compile_dir(path, quiet=1, workers=2)\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "list(getPlugins(IServiceMaker))\n")


def ensure_bytecode(repo=REPO):
    """
    Byte-compile the proxy and its libraries, as any normal install does.

    Environments that set PYTHONDONTWRITEBYTECODE (this one does) never cache bytecode, so every start
    compiles every module from source, which leaves ~10 MiB of compiler garbage in the RSS we measure.  It
    also writes Twisted's plugin cache (C{twisted/plugins/dropin.cache}): without it, the first start of a fresh
    checkout imports every plugin to write it, and its idle RSS is ~12 MiB higher.

    @param repo: the checkout whose C{linkproxy} and C{twisted} packages, and whose C{.venv}'s libraries, are
        compiled (with that venv's Python).
    """
    python = Path(repo) / ".venv" / "bin" / "python"
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
        subprocess.run([str(python), "-c", _COMPILE, str(Path(repo) / "linkproxy"), str(Path(repo) / "twisted")],
                       env=env, cwd=str(repo), check=True, timeout=600)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"byte-compiling {repo} with {python} failed: {e}") from None


def checkout_label(repo=REPO):
    """
    The checkout's short commit, with C{+modified} when its proxy code has uncommitted changes.

    @param repo: a git checkout of linkproxy.
    @return: for example C{"2068e4c"} or C{"4ac7a2f+modified"}; C{"?"} when git cannot tell.
    """
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "linkproxy", "twisted",
                                "setup.cfg", "pyproject.toml"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "?"
    return head + ("+modified" if dirty else "")


def ensure_tools(names=("haproxy", "nginx", "wrk", "h2load")):
    """
    Make sure every binary in C{names} is installed; install the missing ones' Debian packages.

    apt-get update runs only when something has to be installed.  A temporary policy-rc.d (only if none exists)
    stops the packages' maintainer scripts from starting system-wide nginx/haproxy daemons we did not ask for.
    """
    missing = [n for n in names if which(n) is None]
    if not missing:
        return {n: which(n) for n in names}
    pkgs = sorted({TOOL_PACKAGES[n] for n in missing})
    if os.geteuid() != 0:
        raise BenchError(f"missing {', '.join(missing)}; install as root: apt-get install -y {' '.join(pkgs)}")
    log(f"installing {' '.join(pkgs)} (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = False
    try:
        if not policy.exists():
            policy.write_text("#!/bin/sh\n# temporary, written by linkproxy bench/_harness.py\nexit 101\n")
            policy.chmod(0o755)
            created_policy = True
        subprocess.run(["apt-get", "update"], env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"installing {' '.join(pkgs)} failed: {e}") from None
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)
    still = [n for n in names if which(n) is None]
    if still:
        raise BenchError(f"still missing after install: {', '.join(still)}")
    return {n: which(n) for n in names}


def tool_versions():
    out = {}
    for cmd, key in ((["haproxy", "-v"], "haproxy"), (["nginx", "-v"], "nginx"), (["wrk", "-v"], "wrk"),
                     (["h2load", "--version"], "h2load")):
        path = which(cmd[0])
        if path is None:
            continue
        try:
            p = subprocess.run([path, *cmd[1:]], capture_output=True, text=True, timeout=10)
            text = (p.stdout + p.stderr).strip().splitlines()
            out[key] = text[0].strip() if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            out[key] = "?"
    return out


# --------------------------------------------------------------------------------------------------------------
# ports


_handed_out = set()


def free_port():
    """A TCP port on 127.0.0.1 that is free now (never the same one twice in one bench run)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise BenchError("could not find a free port")


def port_open(port, host=LOCALHOST):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# /proc sampling


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        kids.setdefault(int(rest[1]), []).append(int(d))  # rest[1] is ppid (field 4)
    return kids


def process_tree(pid):
    """C{pid} and its live descendants (linkproxy --workers N forks; nginx/haproxy here are single processes)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pid, tree=True):
    """utime+stime of C{pid} (and its live descendants), in seconds, from /proc/PID/stat."""
    total = 0
    for p in (process_tree(pid) if tree else [pid]):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        total += int(rest[11]) + int(rest[12])  # fields 14 (utime) and 15 (stime)
    return total / CLK_TCK


def rss_kib(pid, tree=True):
    """VmRSS of C{pid} (and its live descendants), in KiB, from /proc/PID/status."""
    total = 0
    for p in (process_tree(pid) if tree else [pid]):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


@dataclass
class Usage:
    cpu_s: float
    rss_kib: int


def sample(pid):
    return Usage(cpu_seconds(pid), rss_kib(pid))


# --------------------------------------------------------------------------------------------------------------
# processes


def _affinity(cpus):
    if not cpus:
        return None

    def pre():
        os.sched_setaffinity(0, cpus)
    return pre


class Proc:
    """One process the bench started, in its own session so that it and its children can be ended together."""

    def __init__(self, name, argv, logpath, env=None, cwd=None, cpus=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.logpath = Path(logpath)
        with open(self.logpath, "wb") as logf:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                          env=env, cwd=cwd, start_new_session=True, preexec_fn=_affinity(cpus))
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def tail(self, lines=30):
        try:
            text = self.logpath.read_text(errors="replace")
        except OSError:
            return ""
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("{"):  # Twisted JSON log events: show just the text
                try:
                    ev = json.loads(line)
                    line = "  ".join(str(x) for x in (ev.get("log_level", {}).get("name", ""),
                                                      ev.get("log_namespace", ""),
                                                      ev.get("log_text") or ev.get("log_format") or line))
                    if ev.get("log_failure"):
                        line += f"\n{ev['log_failure']}"
                except (ValueError, AttributeError):
                    pass
            out.append(line)
        return "\n".join(out[-lines:])

    def stop(self, timeout=5.0):
        """SIGTERM, then SIGKILL, to this process's own process group (only it and its descendants)."""
        if self.popen.returncode is not None and not self._group_exists():
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not self._group_exists():
                return
            time.sleep(0.2)

    def _group_exists(self):
        try:
            os.killpg(self.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


class Harness:
    """Owns a temp dir and every process a bench starts; ends them all on exit, error, Ctrl-C or SIGTERM."""

    def __init__(self, keep_tmp=False, pin=False):
        self.tmp = Path(tempfile.mkdtemp(prefix="linkproxy-bench-"))
        self.keep_tmp = keep_tmp
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self.procs = []
        self._names = {}
        self._closed = False

    # CPU placement when --pin: load generator + backend on CPU 0, the proxy under test alone on CPU 1.
    @property
    def load_cpus(self):
        return {0} if self.pin else None

    @property
    def proxy_cpus(self):
        return {1} if self.pin else None

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_exit)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
        atexit.register(self.close)
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self._closed:
            return
        self._closed = True
        for p in reversed(self.procs):
            p.stop()
        if self.keep_tmp:
            log(f"kept temp dir {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return self.tmp / name

    def unique(self, name):
        """C{name}, or C{name-2}, C{name-3}... if already used in this run (for repeated starts)."""
        n = self._names.get(name, 0) + 1
        self._names[name] = n
        return name if n == 1 else f"{name}-{n}"

    def start(self, name, argv, env=None, cwd=None, cpus=None, exact_name=False):
        """Start C{argv} as a tracked process; its output goes to <tmp>/<name>.log.  Returns a L{Proc}."""
        if not exact_name:
            name = self.unique(name)
        p = Proc(name, argv, self.path(f"{name}.log"), env=env, cwd=cwd or self.tmp, cpus=cpus)
        self.procs.append(p)
        return p

    # ---- waiting

    def wait_port(self, proc, port, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode} before listening on {port}:\n"
                                 f"{proc.tail()}")
            if port_open(port):
                return
            time.sleep(0.05)
        raise BenchError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s:\n{proc.tail()}")

    # ---- backends and proxies

    def start_nginx(self, h2=False):
        """
        nginx answering every request with 200 and a small body.  Returns (proc, http1_port, h2c_port or None).
        """
        port = free_port()
        h2port = free_port() if h2 else None
        name = self.unique("nginx")
        d = self.path(name)
        d.mkdir()
        h2server = ""
        if h2:
            h2server = f"""
    server {{
        listen {LOCALHOST}:{h2port} http2;
        location / {{ return 200 "{BODY.strip()}\\n"; }}
    }}"""
        conf = f"""daemon off;
master_process off;
worker_processes 1;
error_log stderr warn;
pid {d}/nginx.pid;
worker_rlimit_nofile 16384;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;  # also caps requests per h2 connection: keep above h2load -n / -c
    keepalive_timeout 120s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    server {{
        listen {LOCALHOST}:{port};
        location / {{ return 200 "{BODY.strip()}\\n"; }}
    }}{h2server}
}}
"""
        (d / "nginx.conf").write_text(conf)
        proc = self.start(name, [which("nginx"), "-e", "stderr", "-p", d, "-c", d / "nginx.conf"],
                          cpus=self.load_cpus, exact_name=True)
        self.wait_port(proc, port)
        if h2port:
            self.wait_port(proc, h2port)
        return proc, port, h2port

    def start_haproxy(self, mode, backend_port, h2=False):
        """HAProxy, one thread, C{mode} "tcp" or "http"; C{h2}: h2c on the bind and to the server."""
        assert mode in ("tcp", "http")
        port = free_port()
        name = self.unique(f"haproxy-{mode}{'-h2' if h2 else ''}")
        d = self.path(name)
        d.mkdir()
        proto = " proto h2" if h2 else ""
        conf = f"""global
    nbthread 1
    maxconn 4096

defaults
    mode {mode}
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend fe
    bind {LOCALHOST}:{port}{proto}
    default_backend be

backend be
    server s1 {LOCALHOST}:{backend_port}{proto}
"""
        (d / "haproxy.cfg").write_text(conf)
        proc = self.start(name, [which("haproxy"), "-db", "-f", d / "haproxy.cfg"], cpus=self.proxy_cpus,
                          exact_name=True)
        self.wait_port(proc, port)
        return proc, port

    def start_linkproxy(self, app_port, tcp_target_port=None, env=(), args=(), timeout=30.0, repo=None):
        """
        linkproxy from the repo's venv: `twist linkproxy --config FILE`, with a generated YAML config.

        Waits for GET /ready on the admin port to answer 200 and for every data port to accept; raises
        L{LinkproxyStartError} with the log tail otherwise.  Returns a L{Linkproxy} with its ports and idle RSS.

        @param repo: another checkout to run instead of this one (C{--baseline}): its C{.venv/bin/twist},
            with C{PYTHONPATH} set to it; C{None} for this repo.
        """
        repo = Path(repo) if repo is not None else REPO
        twist = repo / ".venv" / "bin" / "twist"
        if not twist.exists():
            raise LinkproxyStartError(f"{twist} not found: create the venv in {repo}/.venv first")
        if repo not in _compiled:
            ensure_bytecode(repo)
            _compiled.add(repo)
        lp = Linkproxy(out_port=free_port(), in_port=free_port(), admin_port=free_port(),
                       tcp_port=free_port() if tcp_target_port else None, app_port=app_port,
                       tcp_target_port=tcp_target_port)
        cfg = self.path(f"{self.unique('linkproxy-config')}.yaml")
        cfg.write_text(lp.config_yaml())
        penv = dict(os.environ)
        penv["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), penv.get("PYTHONPATH")]))
        for item in env:
            k, _, v = item.partition("=")
            penv[k] = v
        argv = [twist, "linkproxy", "--config", cfg, *args]
        proc = self.start("linkproxy" if repo == REPO else "linkproxy-base", argv, env=penv, cpus=self.proxy_cpus)
        lp.proc = proc
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if not proc.alive():
                raise LinkproxyStartError(
                    f"linkproxy exited with code {proc.popen.returncode} during startup "
                    f"({' '.join(map(str, argv))}).\n--- last lines of its output ---\n{proc.tail()}\n"
                    "--- (use --no-linkproxy to measure only the references)")
            try:
                status, body = http_get(lp.admin_port, "/ready", timeout=1.0)
                if status == 200:
                    break
                last = f"{status} {body.strip()[:200]}"
            except OSError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise LinkproxyStartError(
                    f"linkproxy did not become ready within {timeout:.0f}s (GET http://{LOCALHOST}:{lp.admin_port}"
                    f"/ready: {last}).\n--- last lines of its output ---\n{proc.tail()}\n"
                    "--- (use --no-linkproxy to measure only the references)")
            time.sleep(0.1)
        lp.idle_rss_kib = rss_kib(proc.pid)  # after ready, before any load
        for port in filter(None, (lp.out_port, lp.in_port, lp.tcp_port)):
            try:
                self.wait_port(proc, port, timeout=5.0)
            except BenchError as e:
                raise LinkproxyStartError(f"linkproxy is ready but: {e}") from None
        return lp


@dataclass
class Linkproxy:
    out_port: int
    in_port: int
    admin_port: int
    tcp_port: int
    app_port: int
    tcp_target_port: int
    proc: Proc = None
    idle_rss_kib: int = 0

    def config_yaml(self):
        lines = ["outbound:", f"  listen: tcp:{self.out_port}:interface={LOCALHOST}"]
        if self.tcp_port:
            lines += ["  tcp_routes:",
                      f"    - listen: tcp:{self.tcp_port}:interface={LOCALHOST}",
                      f"      target: {LOCALHOST}:{self.tcp_target_port}"]
        lines += [f"inbound: tcp:{self.in_port}:interface={LOCALHOST}",
                  f"admin: tcp:{self.admin_port}:interface={LOCALHOST}",
                  f"app: tcp:host={LOCALHOST}:port={self.app_port}",
                  "log_level: warn", ""]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# HTTP smoke checks


def http_get(port, path="/", host=None, timeout=5.0):
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        headers = {"Host": host} if host else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("latin-1")
    finally:
        conn.close()


def check_http(t, expect_body=BODY):
    """One GET through a target before loading it, so that a proxy answering errors fast is not measured."""
    try:
        status, body = http_get(t.port, "/", host=t.host)
    except OSError as e:
        raise BenchError(smoke_failure(t, f"GET http://{LOCALHOST}:{t.port}/ (Host: {t.host}) failed: {e}")) from None
    if status != 200 or body != expect_body:
        raise BenchError(smoke_failure(t, f"GET http://{LOCALHOST}:{t.port}/ (Host: {t.host}) answered {status} "
                                          f"{body[:200]!r}, expected 200 {expect_body!r}"))


def smoke_all(targets, check, keep_going=False):
    """
    Run C{check(target)} on every target.  A failing linkproxy target ends the bench, or with C{keep_going} is
    dropped (reported, and the verdict becomes INCOMPLETE).  Returns (kept targets, {name: error}).
    """
    kept, failed = [], {}
    for t in targets:
        try:
            check(t)
        except BenchError as e:
            if not (keep_going and t.kind == "linkproxy"):
                raise
            log(f"skipping {t.name}: {e}")
            failed[t.name] = str(e).splitlines()[0]
            continue
        kept.append(t)
    return kept, failed


def background_cpu(seconds=1.0):
    """Fraction of all CPUs busy over C{seconds}, from /proc/stat (before the bench starts anything)."""
    def read():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle
    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def smoke_failure(t, what):
    msg = f"{t.name}: {what}"
    if t.kind == "linkproxy" and t.proc is not None:
        msg += (f"\n--- last lines of linkproxy's output ---\n{t.proc.tail()}\n"
                "--- (linkproxy started but does not serve this scenario yet; --no-linkproxy measures the references)")
    return msg


# --------------------------------------------------------------------------------------------------------------
# load generators


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _to_us(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(out):
    r = {"rps": None, "requests": None, "p50_us": None, "p99_us": None, "errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    if m:
        r["requests"] = int(m.group(1))
        r["elapsed_s"] = _to_us(m.group(2)) / 1e6
    for pct, key in (("50", "p50_us"), ("99", "p99_us")):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+(?:us|ms|s|m|h))\s*$", out, re.M)
        if m:
            r[key] = _to_us(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r["non2xx"] = int(m.group(1))
    if r["rps"] is None or r["requests"] is None:
        raise BenchError(f"could not parse wrk output:\n{out}")
    return r


def run_wrk(port, connections, duration, headers=(), threads=1, cpus=None, path="/"):
    """wrk --latency against http://127.0.0.1:PORT/ for C{duration} seconds (integer, >= 1)."""
    duration = max(1, int(round(duration)))
    argv = [which("wrk"), f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://{LOCALHOST}:{port}{path}")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, preexec_fn=_affinity(cpus))
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish in {duration + 30}s: {' '.join(argv)}") from None
    if p.returncode != 0:
        raise BenchError(f"wrk failed ({p.returncode}): {' '.join(argv)}\n{p.stdout}{p.stderr}")
    return parse_wrk(p.stdout)


def _percentile(sorted_vals, pct):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(pct / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return float(sorted_vals[k])


def parse_h2load(out, logfile=None):
    r = {"rps": None, "requests": None, "succeeded": 0, "errors": 0, "non2xx": 0, "p50_us": None, "p99_us": None,
         "mean_us": None}
    m = re.search(r"finished in ([\d.]+\w+), ([\d.]+) req/s", out)
    if m:
        r["elapsed_s"] = _to_us(m.group(1)) / 1e6
        r["rps"] = float(m.group(2))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if m:
        total, _started, done, ok, failed, errored, tmo = (int(x) for x in m.groups())
        r["requests"] = done
        r["succeeded"] = ok
        r["errors"] = failed + errored + tmo + (total - done)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r["non2xx"] = sum(int(x) for x in m.groups()[1:])
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        r["mean_us"] = _to_us(m.group(3))
    if logfile and os.path.exists(logfile):
        durs = []
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    durs.append(int(parts[2]))
        durs.sort()
        r["p50_us"] = _percentile(durs, 50)
        r["p99_us"] = _percentile(durs, 99)
    if r["rps"] is None or r["requests"] is None:
        raise BenchError(f"could not parse h2load output:\n{out}")
    return r


def run_h2load(url, clients, streams, requests, connect_to=None, threads=1, cpus=None, logfile=None,
               timeout=120):
    """h2load (h2c, prior knowledge) with a bounded request count; p50/p99 come from its per-request log."""
    argv = [which("h2load"), "-t", str(threads), "-c", str(clients), "-m", str(streams), "-n", str(requests)]
    if connect_to:
        argv.append(f"--connect-to={connect_to}")
    if logfile:
        argv.append(f"--log-file={logfile}")
    argv.append(url)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=_affinity(cpus))
    except subprocess.TimeoutExpired:
        raise BenchError(f"h2load did not finish in {timeout:.0f}s: {' '.join(argv)}") from None
    if p.returncode != 0:
        raise BenchError(f"h2load failed ({p.returncode}): {' '.join(argv)}\n{p.stdout}{p.stderr}")
    return parse_h2load(p.stdout, logfile)


# --------------------------------------------------------------------------------------------------------------
# targets, measurement, reporting


@dataclass
class Target:
    """One thing to load: "direct" (the backend itself), "haproxy" or a linkproxy listener."""
    name: str
    kind: str  # "direct" | "haproxy" | "linkproxy"
    port: int
    proc: Proc = None  # the proxy whose CPU/RSS is sampled (None for direct)
    headers: tuple = ()
    host: str = None  # Host header for the smoke check
    idle_rss_kib: int = None
    extra: dict = field(default_factory=dict)


def common_args(description, default_duration=10, default_latency_duration=5):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=default_duration,
                    help="seconds of each throughput run (default %(default)s)")
    ap.add_argument("--latency-duration", type=float, default=default_latency_duration,
                    help="seconds of each single-connection latency run (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load per target (default 2)")
    ap.add_argument("--connections", type=int, default=50, help="concurrent connections for throughput (default 50)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat all targets this many times (order rotated) and report medians (default 1)")
    ap.add_argument("--no-linkproxy", action="store_true",
                    help="measure only the references (HAProxy and direct): for testing the harness")
    ap.add_argument("--pin", action="store_true",
                    help="pin load generator+backend to CPU 0 and the proxy under test to CPU 1")
    ap.add_argument("--lp-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for linkproxy (repeatable), e.g. LINKPROXY_WORKERS=1")
    ap.add_argument("--lp-arg", action="append", default=[], metavar="ARG",
                    help="extra argument appended to `twist linkproxy --config FILE` (repeatable)")
    ap.add_argument("--keep-going", action="store_true",
                    help="drop a linkproxy target whose smoke request fails instead of stopping (verdict INCOMPLETE)")
    ap.add_argument("--startup-timeout", type=float, default=30, help="seconds to wait for linkproxy /ready")
    ap.add_argument("--json", metavar="PATH",
                    help="write results as JSON here (default bench/out/<scenario>-<time>.json)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with configs and process logs")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="A/B: also run linkproxy from checkout DIR (with its own .venv, e.g. a git worktree of "
                         "the commit a change started from) as targets named <target>@base, in the same "
                         "interleaved rounds, and compare")
    return ap


_PER_ROUND = ("rps", "cpu_us_per_req", "p50_us", "p99_us")  # also kept round by round, as <key>_per_round


def _median_results(results):
    """Median over rounds of every numeric field; errors are summed; L{_PER_ROUND} fields also kept as lists."""
    if len(results) == 1:
        return dict(results[0])
    out = {}
    for k in results[0]:
        vals = [r.get(k) for r in results]
        if k in ("errors", "non2xx"):
            out[k] = sum(v or 0 for v in vals)
        elif all(isinstance(v, (int, float)) for v in vals):
            out[k] = statistics.median(vals)
        else:
            out[k] = vals[-1]
        if k in _PER_ROUND:
            out[f"{k}_per_round"] = vals
    out["rounds"] = len(results)
    return out


def run_rounds(targets, rounds, measure_one):
    """Run C{measure_one(target)} for every target, C{rounds} times with the order rotated; medians per target."""
    per = {t.name: [] for t in targets}
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for t in order:
            log(f"round {r + 1}/{rounds}: {t.name}")
            per[t.name].append(measure_one(t))
    return {name: _median_results(res) for name, res in per.items()}


def measure_wrk_target(t, args, harness):
    """Warm up, then c=args.connections throughput (with proxy CPU/RSS sampled) and c=1 latency, both with wrk."""
    cpus = harness.load_cpus
    if args.warmup > 0:
        run_wrk(t.port, args.connections, args.warmup, t.headers, cpus=cpus)
    before = sample(t.proc.pid) if t.proc else None
    thr = run_wrk(t.port, args.connections, args.duration, t.headers, cpus=cpus)
    after = sample(t.proc.pid) if t.proc else None
    lat = run_wrk(t.port, 1, args.latency_duration, t.headers, cpus=cpus)
    res = {
        "rps": thr["rps"], "requests": thr["requests"],
        "p50_c50_us": thr["p50_us"], "p99_c50_us": thr["p99_us"],
        "p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "rps_c1": lat["rps"],
        "errors": thr["errors"] + lat["errors"], "non2xx": thr["non2xx"] + lat["non2xx"],
    }
    if t.proc:
        cpu = after.cpu_s - before.cpu_s
        res.update(cpu_s=cpu, cpu_us_per_req=cpu * 1e6 / max(1, thr["requests"]),
                   cpu_util=cpu / max(1e-9, thr.get("elapsed_s", args.duration)),
                   rss_before_kib=before.rss_kib, rss_after_kib=after.rss_kib)
    return res


def _fmt(v, spec="{:.0f}", none="-"):
    return none if v is None else spec.format(v)


def print_table(title, headers, rows):
    cols = list(zip(*([headers] + rows))) if rows else [[h] for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = "  ".join("-" * w for w in widths)
    print()
    print(title)
    print(line)
    print("  ".join(str(h).rjust(w) if i else str(h).ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print(line)
    for row in rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(line)


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def report(targets, results, ref="haproxy", direct="direct", latency_label="c=1"):
    """
    Print absolute numbers and ratios vs the reference (HAProxy) and the added latency vs direct.

    Returns the ratio rows (a dict per target) for the verdict and the JSON.
    """
    refr = results.get(ref, {})
    dirr = results.get(direct, {})
    rows, thr_rows, lat_rows = {}, [], []
    for t in targets:
        r = results[t.name]
        x = {
            "rps_vs_ref": ratio(r.get("rps"), refr.get("rps")),
            "rps_vs_direct": ratio(r.get("rps"), dirr.get("rps")),
            "cpu_vs_ref": ratio(r.get("cpu_us_per_req"), refr.get("cpu_us_per_req")),
            "added_p50_us": None if t.name == direct or r.get("p50_us") is None or dirr.get("p50_us") is None
            else r["p50_us"] - dirr["p50_us"],
            "added_p99_us": None if t.name == direct or r.get("p99_us") is None or dirr.get("p99_us") is None
            else r["p99_us"] - dirr["p99_us"],
            "p50_vs_ref": ratio(r.get("p50_us"), refr.get("p50_us")),
        }
        rows[t.name] = x
        errs = (r.get("errors") or 0) + (r.get("non2xx") or 0)
        thr_rows.append([
            t.name, _fmt(r.get("rps")), _fmt(x["rps_vs_ref"], "{:.2f}x"), _fmt(x["rps_vs_direct"], "{:.2f}x"),
            _fmt(r.get("cpu_us_per_req"), "{:.1f}"), _fmt(x["cpu_vs_ref"], "{:.2f}x"),
            _fmt(r.get("cpu_util"), "{:.0%}"), _fmt(r.get("p50_c50_us")), _fmt(r.get("p99_c50_us")),
            str(errs) if errs else "0",
        ])
        lat_rows.append([
            t.name, _fmt(r.get("p50_us")), _fmt(r.get("p99_us")), _fmt(x["added_p50_us"], "{:+.0f}"),
            _fmt(x["added_p99_us"], "{:+.0f}"), _fmt(x["p50_vs_ref"], "{:.2f}x"),
            _fmt(t.idle_rss_kib / 1024 if t.idle_rss_kib else None, "{:.1f}"),
            _fmt(r.get("rss_after_kib") / 1024 if r.get("rss_after_kib") else None, "{:.1f}"),
        ])
    print_table("Throughput (proxy CPU = utime+stime of the proxy process tree during the run / requests)",
                ["target", "req/s", f"x{ref}", f"x{direct}", "CPU us/req", f"x{ref}", "CPU util",
                 "p50 @load", "p99 @load", "errors"], thr_rows)
    print_table(f"Latency ({latency_label}) and memory",
                ["target", "p50 us", "p99 us", f"+p50 vs {direct}", f"+p99 vs {direct}", f"p50 x{ref}",
                 "RSS idle MiB", "RSS after MiB"], lat_rows)
    return rows


def verdict(checks):
    """
    C{checks}: list of (label, value, op, target, fmt).  Prints one VERDICT line; returns True/False/None (n/a).
    """
    parts, states = [], []
    for label, value, op, target, fmt in checks:
        if value is None:
            parts.append(f"{label} n/a")
            states.append(None)
            continue
        good = value >= target if op == ">=" else value <= target
        states.append(good)
        parts.append(f"{label} {fmt.format(value)} (target {op} {fmt.format(target)}) {'PASS' if good else 'FAIL'}")
    ok = False if False in states else (None if None in states or not states else True)
    word = {True: "PASS", False: "FAIL", None: "INCOMPLETE"}[ok]
    print()
    print(f"VERDICT {word}: " + "; ".join(parts))
    return ok


def target_checks(name, results, ratios, skipped, rps_ratio, added_p50_us=None):
    """The standard checks for one linkproxy target: req/s ratio vs HAProxy, optional added p50, no errors."""
    if name in skipped or name not in results:
        return [(f"{name} (not served, see above)", None, ">=", 0, "")]
    r, x = results[name], ratios[name]
    checks = [(f"{name}/haproxy req/s", x["rps_vs_ref"], ">=", rps_ratio, "{:.2f}x")]
    if added_p50_us is not None:
        checks.append((f"{name} added p50 us", x["added_p50_us"], "<=", added_p50_us, "{:+.0f}"))
    checks.append((f"{name} errors", (r.get("errors") or 0) + (r.get("non2xx") or 0), "<=", 0, "{:.0f}"))
    return checks


def _rss_after_kib(r):
    """RSS after the throughput run: of the proxy, or summed over the proxies of a path (mesh: A and B)."""
    if r.get("rss_after_kib"):
        return r["rss_after_kib"]
    return sum(v for k, v in r.items() if k.startswith("rss_after_kib_") and isinstance(v, (int, float))) or None


def report_baseline(targets, results, args):
    """
    With C{--baseline}: print every target next to its C{@base} twin, measured in the same rounds.

    @return: C{{name: {...}}} for every current target that has a measured twin: both sides' medians of req/s,
        CPU us per request (and its value in each round), c=1 p50/p99 and RSS after the load, the req/s ratio
        and the CPU change (a fraction: +0.03 is 3% more CPU per request than the baseline); C{{}} without
        C{--baseline}.
    """
    if not getattr(args, "baseline", None):
        return {}
    names = {t.name for t in targets}
    out, rows = {}, []
    for t in targets:
        base = t.name + BASELINE
        if t.name.endswith(BASELINE) or base not in names:
            continue
        cur, old = results[t.name], results[base]
        c = {
            "rps": cur.get("rps"), "rps_base": old.get("rps"), "rps_vs_base": ratio(cur.get("rps"), old.get("rps")),
            "cpu_us_per_req": cur.get("cpu_us_per_req"), "cpu_us_per_req_base": old.get("cpu_us_per_req"),
            "p50_us": cur.get("p50_us"), "p50_us_base": old.get("p50_us"),
            "p99_us": cur.get("p99_us"), "p99_us_base": old.get("p99_us"),
            "rss_after_kib": _rss_after_kib(cur), "rss_after_kib_base": _rss_after_kib(old),
            "cpu_us_per_req_per_round": cur.get("cpu_us_per_req_per_round"),
            "cpu_us_per_req_base_per_round": old.get("cpu_us_per_req_per_round"),
        }
        cpu_ratio = ratio(c["cpu_us_per_req"], c["cpu_us_per_req_base"])
        c["cpu_change"] = None if cpu_ratio is None else cpu_ratio - 1
        out[t.name] = c
        mib = lambda kib: None if not kib else kib / 1024  # noqa: E731
        rows.append([
            t.name, _fmt(c["rps"]), _fmt(c["rps_base"]), _fmt(c["rps_vs_base"], "{:.3f}x"),
            _fmt(c["cpu_us_per_req"], "{:.1f}"), _fmt(c["cpu_us_per_req_base"], "{:.1f}"),
            _fmt(c["cpu_change"], "{:+.1%}"), f"{_fmt(c['p50_us'])} / {_fmt(c['p50_us_base'])}",
            f"{_fmt(c['p99_us'])} / {_fmt(c['p99_us_base'])}",
            f"{_fmt(mib(c['rss_after_kib']), '{:.1f}')} / {_fmt(mib(c['rss_after_kib_base']), '{:.1f}')}",
        ])
    print_table(f"Current {checkout_label()} vs baseline {checkout_label(args.baseline)} ({args.baseline}), "
                f"same rounds",
                ["target", "req/s", "req/s base", "x base", "CPU us/req", "base", "CPU change",
                 "p50 c=1 / base", "p99 c=1 / base", "RSS after MiB / base"], rows)
    return out


def baseline_checks(comparison, tolerance=BASELINE_CPU_TOLERANCE):
    """Verdict checks for L{report_baseline}'s result: each target's CPU per request within C{tolerance}."""
    return [(f"{name} CPU us/req vs {name}{BASELINE}", c["cpu_change"], "<=", tolerance, "{:+.1%}")
            for name, c in comparison.items()]


def baseline_json(args, comparison):
    """The C{baseline} entry of the JSON results (C{{}} without C{--baseline})."""
    if not getattr(args, "baseline", None):
        return {}
    return {"baseline": {"dir": str(args.baseline), "commit": checkout_label(args.baseline),
                         "current_commit": checkout_label(), "comparison": comparison}}


def write_json(scenario, args, targets, results, ratios, verdict_ok, path=None, skipped=None, extra=None):
    OUT_DIR.mkdir(exist_ok=True)
    if path is None:
        path = OUT_DIR / f"{scenario}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    doc = {
        "scenario": scenario,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "tools": tool_versions(),
        "args": vars(args),
        "targets": {t.name: dict(results[t.name], kind=t.kind, idle_rss_kib=t.idle_rss_kib, **ratios[t.name])
                    for t in targets},
        "skipped": skipped or {},
        "verdict": {True: "PASS", False: "FAIL", None: "INCOMPLETE"}[verdict_ok],
    }
    doc.update(extra or {})
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(f"results written to {path}")


def print_header(scenario, args, extra=""):
    sys.stdout.reconfigure(line_buffering=True)
    tv = tool_versions()
    print(f"== linkproxy bench: {scenario} ==  {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{tv.get('haproxy', 'haproxy ?')}")
    load = getattr(args, "load_label", f"c={args.connections}")
    print(f"   duration {args.duration:g}s @ {load}, latency {args.latency_duration:g}s @ c=1, "
          f"warmup {args.warmup:g}s, rounds {args.rounds}, pin {'on' if args.pin else 'off'}{extra}")
    print("   The machine is noisy: compare ratios (x haproxy, + us vs direct), not absolute numbers.")
    if getattr(args, "baseline", None):
        print(f"   A/B: current {checkout_label()} ({REPO}) vs baseline {checkout_label(args.baseline)} "
              f"({args.baseline}), targets <name>{BASELINE}")
    busy = background_cpu()
    print(f"   background CPU before start: {busy:.0%} of {os.cpu_count()} CPUs"
          + ("  ** WARNING: something else is using the CPUs; expect noisy numbers **" if busy > 0.15 else ""))


def main_wrapper(fn):
    """Run a scenario's main; clear one-paragraph messages for expected failures; exit codes 0 / 1 / 2."""
    try:
        sys.exit(fn())
    except LinkproxyStartError as e:
        print(f"\nERROR: linkproxy did not start: {e}", file=sys.stderr)
        sys.exit(2)
    except BenchError as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def print_kv(label, value, fmt="{}"):
    print(f"{label}: {'n/a' if value is None else fmt.format(value)}")
