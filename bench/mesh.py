#!/usr/bin/env python3
"""
Mesh: HTTP/1 across two proxies with mutual TLS between them, the whole path measured, in one run.

    wrk ──plain──▶ proxy A ══ mTLS (TLS 1.3) ══▶ proxy B ──plain──▶ nginx

Targets, all loaded with wrk (c=50 throughput, c=1 latency):
  direct            wrk → nginx.
  haproxy-pair      HAProxy A (`mode http`, plain frontend; server `ssl verify required ca-file crt sni`) →
                    HAProxy B (`bind ... ssl crt ca-file verify required`) → nginx; nbthread 1 each, TLS 1.3.
  linkproxy-pair    linkproxy A (outbound listener, `--discovery file:EPS` naming `web.default:80` as a meshed
                    endpoint behind B) → linkproxy B (inbound listener, `--app` nginx); wrk sends
                    `Host: web.default`.
  linkproxy-pair-h2 the same pair with `--h2-upgrade on`, measured only if a probe shows the upgrade happens.

Certificates come from linkproxy's own tool: `linkproxy-identity init DIR`, then `issue DIR NAME` for each side
(cert.pem + key.pem, concatenated into one PEM for HAProxy).  The linkproxies get DIR without a leaf, so each
issues its own from the trust domain's issuer.

CPU per request is the sum over BOTH proxies of the path (utime+stime during the c=50 run / requests).
Before each wrk run the bench waits until one GET through the target answers 200, so that the table measures the
proxy serving; if it had to wait, the wait and the errors it saw are printed as a NOTE line. (Early builds
ejected the only endpoint for ~1 s when wrk stopped, counting its cancelled requests as endpoint failures;
cancelled requests are now neutral, and the NOTE should not appear.)

Target: linkproxy pair >= 0.35x the HAProxy pair's req/s at c=50.

    .venv/bin/python bench/mesh.py                  # full run (~1 min)
    .venv/bin/python bench/mesh.py --no-linkproxy   # references only
    .venv/bin/python bench/mesh.py --no-h2-upgrade  # skip the --h2-upgrade pair
    .venv/bin/python bench/mesh.py --rounds 3 --baseline DIR  # A/B: also the plain pair from the checkout in DIR

With --baseline DIR, a second plain pair runs from DIR's checkout and .venv (same identity dir and endpoints) as
linkproxy-pair@base; the --h2-upgrade pair is measured for the current checkout only.
"""

import re
import shutil
import ssl
import socket
import subprocess
import sys
import time

import _harness as H

SCENARIO = "mesh"
TARGET_RPS_RATIO = 0.35

TRUST_DOMAIN = "linkproxy.local"
NAME_A = f"client.default.serviceaccount.identity.{TRUST_DOMAIN}"
NAME_B = f"web.default.serviceaccount.identity.{TRUST_DOMAIN}"
SERVICE = "web.default"      # the logical service wrk names (Host), port 80 implied
PROBE_SERVICE = "echo.default"  # a header-echoing backend, for the h2-upgrade probe only
IDENTITY_TOOL = H.REPO / ".venv" / "bin" / "linkproxy-identity"

REF = "haproxy-pair"
LP = "linkproxy-pair"
LP_H2 = "linkproxy-pair-h2"

# A tiny backend that answers with the request line and the request headers exactly as received, so that the
# h2-upgrade probe can see what reaches the app through each pair (and an l5d-orig-proto that was not stripped).
ECHO_SERVER = r'''
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = (self.requestline + "\n" + "".join(f"{k}: {v}\n" for k, v in self.headers.items())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
'''


# --------------------------------------------------------------------------------------------------------------
# identities


def make_identities(h):
    """
    A trust domain and one leaf per side, with linkproxy's own tool.

    @return: (ca.pem path, HAProxy PEM for A, HAProxy PEM for B, identity dir for the linkproxies)
    """
    if not IDENTITY_TOOL.exists():
        raise H.BenchError(f"{IDENTITY_TOOL} not found: install the project into {H.REPO}/.venv first")
    d = h.path("identity")

    def tool(*argv):
        p = subprocess.run([str(IDENTITY_TOOL), *map(str, argv)], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise H.BenchError(f"linkproxy-identity {' '.join(map(str, argv))} failed ({p.returncode}):\n"
                               f"{p.stdout}{p.stderr}")

    tool("init", d, "--trust-domain", TRUST_DOMAIN)
    pems = {}
    for side, name in (("a", NAME_A), ("b", NAME_B)):
        tool("issue", d, name)
        pem = h.path(f"haproxy-{side}.pem")  # HAProxy wants chain + key in one file
        pem.write_bytes((d / "cert.pem").read_bytes() + (d / "key.pem").read_bytes())
        pem.chmod(0o600)
        pems[side] = pem
    ca_pem = h.path("ca.pem")
    shutil.copyfile(d / "ca.pem", ca_pem)
    # No leaf left in DIR: each linkproxy issues its own from issuer.pem (linkproxy/identity/store.py).
    for leftover in ("cert.pem", "key.pem"):
        (d / leftover).unlink()
    return ca_pem, pems["a"], pems["b"], d


# --------------------------------------------------------------------------------------------------------------
# the HAProxy pair


def start_haproxy_cfg(h, name, conf, port):
    name = h.unique(name)
    d = h.path(name)
    d.mkdir()
    (d / "haproxy.cfg").write_text(conf)
    proc = h.start(name, [H.which("haproxy"), "-db", "-f", d / "haproxy.cfg"], cpus=h.proxy_cpus, exact_name=True)
    h.wait_port(proc, port)
    return proc


_HAPROXY_GLOBAL = """global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""


def start_haproxy_pair(h, backend, ca_pem, pem_a, pem_b):
    """HAProxy B (mTLS server in front of nginx), then HAProxy A (plain in, mTLS to B).  Returns (A, B, A's port)."""
    port_a, port_b = H.free_port(), H.free_port()
    conf_b = _HAPROXY_GLOBAL + f"""
frontend fe
    bind {H.LOCALHOST}:{port_b} ssl crt {pem_b} ca-file {ca_pem} verify required ssl-min-ver TLSv1.3
    default_backend be

backend be
    server app {H.LOCALHOST}:{backend}
"""
    proc_b = start_haproxy_cfg(h, "haproxy-b", conf_b, port_b)
    conf_a = _HAPROXY_GLOBAL + f"""
frontend fe
    bind {H.LOCALHOST}:{port_a}
    default_backend be

backend be
    server b {H.LOCALHOST}:{port_b} ssl verify required ca-file {ca_pem} crt {pem_a} sni str({NAME_B}) verifyhost {NAME_B} ssl-min-ver TLSv1.3
"""
    proc_a = start_haproxy_cfg(h, "haproxy-a", conf_a, port_a)
    return proc_a, proc_b, port_a, port_b


# --------------------------------------------------------------------------------------------------------------
# the linkproxy pair


def start_linkproxy_pair(h, args, backend, echo_port, identity_dir, extra=(), repo=None):
    """
    linkproxy B (inbound → nginx), then A (outbound, file discovery naming B as the meshed endpoint).

    @param repo: the checkout both proxies run from (C{--baseline}); C{None} for this one.
    @return: (A, B) as L{H.Linkproxy}.
    """
    common = [*args.lp_arg, "--identity-dir", str(identity_dir), *extra]
    lp_b = h.start_linkproxy(app_port=backend, env=args.lp_env, timeout=args.startup_timeout, repo=repo,
                             args=[*common, "--identity-name", NAME_B])
    eps = h.path(f"{h.unique('endpoints')}.yaml")
    lines = ["services:"]
    for service, port in ((SERVICE, backend), (PROBE_SERVICE, echo_port)):
        lines += [f"  {service}:80:",
                  f"    - addr: {H.LOCALHOST}:{port}",
                  f"      identity: {NAME_B}",
                  f"      proxy: {H.LOCALHOST}:{lp_b.in_port}"]
    eps.write_text("\n".join(lines) + "\n")
    lp_a = h.start_linkproxy(app_port=backend, env=args.lp_env, timeout=args.startup_timeout, repo=repo,
                             args=[*common, "--identity-name", NAME_A, "--discovery", f"file:{eps}"])
    return lp_a, lp_b


def metric_sum(admin_port, name, *labels):
    """Sum of the samples of C{name} on a linkproxy's /metrics whose labels include all C{labels}, and the lines."""
    status, body = H.http_get(admin_port, "/metrics", timeout=5.0)
    if status != 200:
        raise H.BenchError(f"GET /metrics on 127.0.0.1:{admin_port} answered {status}")
    total, lines = 0.0, []
    for m in re.finditer(rf'^{re.escape(name)}\{{([^}}]*)\}}\s+([0-9.eE+-]+)\s*$', body, re.M):
        if all(label in m.group(1) for label in labels):
            total += float(m.group(2))
            lines.append(m.group(0))
    return total, lines


def mtls_requests(admin_port):
    """B's request_total{direction="inbound",tls="true"}: requests that crossed the mesh over mTLS."""
    return metric_sum(admin_port, "request_total", 'direction="inbound"', 'tls="true"')


def mtls_connections(admin_port):
    """B's inbound connections that began with a TLS ClientHello (protocol_detect_total)."""
    return metric_sum(admin_port, "protocol_detect_total", 'direction="inbound"', 'protocol="tls"',
                      'reason="detected"')[0]


def tls_probe(port, client_pem, ca_pem, server_name):
    """One mTLS handshake as a client of the far side: (version, cipher) it negotiates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(ca_pem))
    ctx.load_cert_chain(str(client_pem))
    with socket.create_connection((H.LOCALHOST, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            return s.version(), s.cipher()[0]


def raw_get(port, host, headers=()):
    """GET / with exact header-name case; returns (status, body)."""
    import http.client
    conn = http.client.HTTPConnection(H.LOCALHOST, port, timeout=5)
    try:
        conn.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read().decode("latin-1")
    finally:
        conn.close()


def echo_probe(port):
    """Through an outbound listener to the echo backend: (request line, [header names as received])."""
    status, body = raw_get(port, PROBE_SERVICE, [("X-Mesh-Probe", "Mixed-Case")])
    if status != 200:
        raise H.BenchError(f"probe GET (Host: {PROBE_SERVICE}) answered {status} {body[:200]!r}")
    first, *rest = body.splitlines()
    return first, [line.split(":", 1)[0] for line in rest if ":" in line]


PROBE_CONNECTIONS = 16


def upgrade_probe(t, h):
    """
    What a pair does with HTTP/1 between its proxies: the request the app sees, and how many mTLS connections
    B accepts while C{PROBE_CONNECTIONS} clients send requests concurrently through A for 1 s (HTTP/1 needs one
    connection per request in flight; HTTP/2 multiplexes them).
    """
    far = t.extra["far"]
    echo = echo_probe(t.extra["echo_port"])
    settle(t)
    before = mtls_connections(far.admin_port)
    H.run_wrk(t.port, PROBE_CONNECTIONS, 1, t.headers, cpus=h.load_cpus)
    conns = mtls_connections(far.admin_port) - before
    settle(t)
    status, body = H.http_get(t.extra["near"].admin_port, "/env.json")
    option = re.search(r'"h2_upgrade":\s*(true|false)', body) if status == 200 else None
    return {"echo": echo, "connections": conns, "h2_upgrade_option": option.group(1) if option else "?"}


def h2_upgrade_effect(plain, upgraded):
    """
    Compare the plain pair with the --h2-upgrade pair.

    @return: (upgrade seen?, explanation)
    """
    (line0, names0), (line1, names1) = plain["echo"], upgraded["echo"]
    orig = [n for n in names1 if n.lower() == "l5d-orig-proto"]
    c0, c1 = plain["connections"], upgraded["connections"]
    conns = (f"{PROBE_CONNECTIONS} concurrent clients for 1 s opened {c1:.0f} mTLS connections to B "
             f"({c0:.0f} without the option)")
    if c1 <= max(2.0, c0 / 4):
        why = f"HTTP/1 is multiplexed between the proxies: {conns}"
        if orig:
            why += f"; but the app saw {orig[0]} (the inbound proxy should strip it)"
        return True, why
    if orig:
        return True, f"the app saw {orig[0]}, so requests are carried as HTTP/2, but not multiplexed: {conns}"
    same = "the same request as without it" if (line1, names1) == (line0, names0) else \
        f"(without the option: {line0!r}, headers {', '.join(names0)})"
    return False, (f"--h2-upgrade on is accepted (/env.json h2_upgrade={upgraded['h2_upgrade_option']}) but has "
                   f"no effect: {conns}, and the app sees {same} ({line1!r}, headers {', '.join(names1)}; no "
                   f"l5d-orig-proto): HTTP/1 still crosses the mesh as HTTP/1")


# --------------------------------------------------------------------------------------------------------------
# measurement and report


def settle(t, timeout=20.0):
    """
    Before each load run: wait until one GET through the target answers 200 again.

    linkproxy can answer 503 for a while after a wrk run ends (cancelled requests eject its only endpoint); the
    bench measures the proxy serving, and reports how long the waits took and what the failures said.
    @return: (seconds waited, failed probes, last failure)
    """
    start = time.monotonic()
    bad, last = 0, None
    while True:
        check_alive(t)
        try:
            status, body = H.http_get(t.port, "/", host=t.host, timeout=2.0)
        except OSError as e:
            status, body = None, str(e)
        if status == 200:
            return time.monotonic() - start, bad, last
        bad += 1
        last = f"{status} {body.strip()[:120]}" if status else body
        if time.monotonic() - start > timeout:
            raise H.BenchError(f"{t.name} did not answer 200 again within {timeout:.0f}s after a load run; "
                               f"last answer: {last}")
        time.sleep(0.05)


def check_alive(t):
    for side, proc in t.extra.get("procs", ()):
        if not proc.alive():
            raise H.BenchError(f"{t.name}: proxy {side.upper()} ({proc.name}) exited with code "
                               f"{proc.popen.returncode}.\n--- last lines of its output ({proc.logpath}) ---\n"
                               f"{proc.tail()}")


def check_target(t):
    """The harness smoke check, plus for a linkproxy pair: B counted it as an inbound request over mTLS."""
    try:
        H.check_http(t)
    except H.BenchError as e:
        far = t.extra.get("far")
        if far is not None:
            raise H.BenchError(f"{e}\n--- last lines of proxy B's output ---\n{far.proc.tail()}") from None
        raise
    far = t.extra.get("far")
    if t.kind == "linkproxy" and far is not None:
        total, lines = mtls_requests(far.admin_port)
        if total < 1:
            raise H.BenchError(H.smoke_failure(
                t, "proxy B's /metrics shows no request_total with direction=\"inbound\", tls=\"true\" after the "
                   "probe: the request did not cross the mesh over mTLS"))
        H.log(f"{t.name}: probe 200; B: {lines[0]}")


def measure(t, args, h):
    cpus = h.load_cpus
    procs = t.extra.get("procs", ())
    far = t.extra.get("far")
    waits = []

    def run(connections, duration):
        waits.append(settle(t))
        r = H.run_wrk(t.port, connections, duration, t.headers, cpus=cpus)
        check_alive(t)
        return r

    mtls0 = mtls_requests(far.admin_port)[0] if (far is not None and t.kind == "linkproxy") else None
    warm = run(args.connections, args.warmup) if args.warmup > 0 else {"requests": 0}
    waits.append(settle(t))
    before = [H.sample(p.pid) for _, p in procs]
    thr = H.run_wrk(t.port, args.connections, args.duration, t.headers, cpus=cpus)
    after = [H.sample(p.pid) for _, p in procs]
    check_alive(t)
    lat = run(1, args.latency_duration)
    res = {
        "rps": thr["rps"], "requests": thr["requests"],
        "p50_c50_us": thr["p50_us"], "p99_c50_us": thr["p99_us"],
        "p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "rps_c1": lat["rps"],
        "errors": thr["errors"] + lat["errors"], "non2xx": thr["non2xx"] + lat["non2xx"],
        # before the warm-up, the c=50 run and the c=1 run: time until a GET answered 200 again
        "settle_s": sum(w[0] for w in waits), "settle_failed_probes": sum(w[1] for w in waits),
        "settle_last_failure": next((w[2] for w in reversed(waits) if w[2]), None),
    }
    if procs:
        elapsed = max(1e-9, thr.get("elapsed_s", args.duration))
        reqs = max(1, thr["requests"])
        total = 0.0
        for (side, _), b, a in zip(procs, before, after):
            cpu = a.cpu_s - b.cpu_s
            total += cpu
            res[f"cpu_us_per_req_{side}"] = cpu * 1e6 / reqs
            res[f"cpu_util_{side}"] = cpu / elapsed
            res[f"rss_after_kib_{side}"] = a.rss_kib
        res["cpu_s"] = total
        res["cpu_us_per_req"] = total * 1e6 / reqs
    if mtls0 is not None:
        res["mtls_requests_at_b"] = mtls_requests(far.admin_port)[0] - mtls0
        res["wrk_requests"] = warm["requests"] + thr["requests"] + lat["requests"]
    return res


def report(targets, results):
    ref, dirr = results.get(REF, {}), results.get("direct", {})
    ratios, thr_rows, lat_rows = {}, [], []
    f = H._fmt
    for t in targets:
        r = results[t.name]
        x = {
            "rps_vs_ref": H.ratio(r.get("rps"), ref.get("rps")),
            "rps_vs_direct": H.ratio(r.get("rps"), dirr.get("rps")),
            "cpu_vs_ref": H.ratio(r.get("cpu_us_per_req"), ref.get("cpu_us_per_req")),
            "added_p50_us": None if t.name == "direct" or None in (r.get("p50_us"), dirr.get("p50_us"))
            else r["p50_us"] - dirr["p50_us"],
            "added_p99_us": None if t.name == "direct" or None in (r.get("p99_us"), dirr.get("p99_us"))
            else r["p99_us"] - dirr["p99_us"],
            "p50_vs_ref": H.ratio(r.get("p50_us"), ref.get("p50_us")),
        }
        ratios[t.name] = x
        errs = (r.get("errors") or 0) + (r.get("non2xx") or 0)
        thr_rows.append([
            t.name, f(r.get("rps")), f(x["rps_vs_ref"], "{:.2f}x"), f(x["rps_vs_direct"], "{:.2f}x"),
            f(r.get("cpu_us_per_req"), "{:.1f}"), f(x["cpu_vs_ref"], "{:.2f}x"),
            f(r.get("cpu_us_per_req_a"), "{:.1f}"), f(r.get("cpu_us_per_req_b"), "{:.1f}"),
            f(r.get("cpu_util_a"), "{:.0%}"), f(r.get("cpu_util_b"), "{:.0%}"),
            f(r.get("p50_c50_us")), f(r.get("p99_c50_us")), str(errs),
        ])
        idle = t.extra.get("idle_rss_kib", {})
        mib = lambda kib: None if not kib else kib / 1024  # noqa: E731
        lat_rows.append([
            t.name, f(r.get("p50_us")), f(r.get("p99_us")), f(x["added_p50_us"], "{:+.0f}"),
            f(x["added_p99_us"], "{:+.0f}"), f(x["p50_vs_ref"], "{:.2f}x"),
            f(mib(idle.get("a")), "{:.1f}"), f(mib(r.get("rss_after_kib_a")), "{:.1f}"),
            f(mib(idle.get("b")), "{:.1f}"), f(mib(r.get("rss_after_kib_b")), "{:.1f}"),
        ])
    H.print_table("Throughput, c=50 (path CPU = utime+stime of proxy A + proxy B during the run / requests)",
                  ["target", "req/s", f"x{REF}", "xdirect", "path CPU us/req", f"x{REF}", "A us/req", "B us/req",
                   "A util", "B util", "p50 @load", "p99 @load", "errors"], thr_rows)
    H.print_table("Latency (c=1) and memory (RSS of each proxy, idle after start and after the c=50 run)",
                  ["target", "p50 us", "p99 us", "+p50 vs direct", "+p99 vs direct", f"p50 x{REF}",
                   "A RSS idle MiB", "A RSS after", "B RSS idle MiB", "B RSS after"], lat_rows)
    return ratios


# --------------------------------------------------------------------------------------------------------------


def main():
    ap = H.common_args(__doc__)
    ap.add_argument("--no-h2-upgrade", action="store_true",
                    help="do not start or measure the linkproxy pair with --h2-upgrade on")
    args = ap.parse_args()
    H.ensure_tools(("haproxy", "nginx", "wrk"))
    H.print_header(SCENARIO, args, ", path: wrk -> proxy A -(mTLS, TLS 1.3)-> proxy B -> nginx")
    with H.Harness(keep_tmp=args.keep_tmp, pin=args.pin) as h:
        _nginx, backend, _ = h.start_nginx()
        ca_pem, pem_a, pem_b, identity_dir = make_identities(h)
        direct_host = f"{H.LOCALHOST}:{backend}"
        targets = [H.Target("direct", "direct", backend, headers=(f"Host: {direct_host}",), host=direct_host)]

        ha_a, ha_b, ha_port, ha_b_port = start_haproxy_pair(h, backend, ca_pem, pem_a, pem_b)
        targets.append(H.Target(REF, "haproxy", ha_port, proc=ha_a, headers=(f"Host: {SERVICE}",), host=SERVICE,
                                extra={"procs": [("a", ha_a), ("b", ha_b)],
                                       "idle_rss_kib": {"a": H.rss_kib(ha_a.pid), "b": H.rss_kib(ha_b.pid)}}))
        wire = {"haproxy B": tls_probe(ha_b_port, pem_a, ca_pem, NAME_B)}

        h2_note = "not measured (--no-h2-upgrade)" if args.no_h2_upgrade else None
        if not args.no_linkproxy:
            echo_port = H.free_port()
            echo = h.start("echo-backend", [sys.executable, "-c", ECHO_SERVER, echo_port], cpus=h.load_cpus)
            h.wait_port(echo, echo_port)

            pairs = [(LP, (), None)]
            if args.baseline:
                pairs.append((LP + H.BASELINE, (), args.baseline))
            if not args.no_h2_upgrade:
                pairs.append((LP_H2, ("--h2-upgrade", "on"), None))
            for name, extra, repo in pairs:
                try:
                    lp_a, lp_b = start_linkproxy_pair(h, args, backend, echo_port, identity_dir, extra, repo)
                except H.LinkproxyStartError as e:
                    if name == LP_H2:
                        h2_note = (f"not measured (the pair did not start with --h2-upgrade on: "
                                   f"{str(e).splitlines()[0]})")
                        H.log(f"{name}: {e}")
                        continue
                    raise
                H.log(f"{name} ready; idle RSS A {lp_a.idle_rss_kib / 1024:.1f} MiB, "
                      f"B {lp_b.idle_rss_kib / 1024:.1f} MiB")
                targets.append(H.Target(name, "linkproxy", lp_a.out_port, proc=lp_a.proc,
                                        headers=(f"Host: {SERVICE}",), host=SERVICE,
                                        extra={"procs": [("a", lp_a.proc), ("b", lp_b.proc)], "near": lp_a,
                                               "far": lp_b, "echo_port": lp_a.out_port,
                                               "idle_rss_kib": {"a": lp_a.idle_rss_kib, "b": lp_b.idle_rss_kib}}))
                if name == LP:
                    wire["linkproxy B"] = tls_probe(lp_b.in_port, pem_a, ca_pem, NAME_B)

        targets, skipped = H.smoke_all(targets, check_target, args.keep_going)

        # --h2-upgrade: measured only if the pair really carries HTTP/1 as HTTP/2 between the proxies
        by = {t.name: t for t in targets}
        probes = {}
        if LP_H2 in by:
            try:
                if LP not in by:
                    raise H.BenchError("the plain linkproxy pair is not served, nothing to compare with")
                probes = {name: upgrade_probe(by[name], h) for name in (LP, LP_H2)}
                effect, why = h2_upgrade_effect(probes[LP], probes[LP_H2])
            except (H.BenchError, OSError) as e:
                effect, why = False, f"the probe through the pair failed: {str(e).splitlines()[0]}"
            H.log(f"h2-upgrade probe: {why}")
            if not effect:
                h2_note = f"not measured ({why})"
                targets = [t for t in targets if t.name != LP_H2]
        elif LP_H2 in skipped and h2_note is None:
            h2_note = f"not measured (its smoke request failed: {skipped[LP_H2]})"

        results = H.run_rounds(targets, args.rounds, lambda t: measure(t, args, h))
        ratios = report(targets, results)
        comparison = H.report_baseline(targets, results, args)

        print()
        for k, (ver, cipher) in wire.items():
            H.print_kv(f"mTLS to {k} (handshake probe as {NAME_A.split('.')[0]})", f"{ver} {cipher}")
        for t in targets:
            r = results[t.name]
            if "mtls_requests_at_b" in r:
                H.print_kv(f"{t.name}: requests B counted as inbound over mTLS / requests wrk completed",
                           f"{r['mtls_requests_at_b']:.0f} / {r['wrk_requests']:.0f}")
            if r.get("settle_failed_probes"):
                print(f"{t.name}: NOTE: after a wrk run ended it failed requests for {r['settle_s']:.1f} s in all "
                      f"({r['settle_failed_probes']:.0f} probe GETs failed, e.g. {r['settle_last_failure']!r}); the "
                      f"bench waits for a 200 before each run, so the table measures it serving")
        if LP_H2 in results:
            x = ratios[LP_H2]["rps_vs_ref"]
            vs_lp = H.ratio(results[LP_H2]["rps"], results.get(LP, {}).get("rps"))
            print(f"h2-upgrade: measured: {H._fmt(x, '{:.2f}x')} {REF} req/s, {H._fmt(vs_lp, '{:.2f}x')} {LP} "
                  f"req/s ({why})")
        elif not args.no_linkproxy:
            print(f"h2-upgrade: {h2_note or 'not measured (unknown reason)'}")

        if args.no_linkproxy:
            checks = [("linkproxy (--no-linkproxy)", None, ">=", 0, "")]
        elif LP not in results:
            checks = [(f"{LP} (not served, see above)", None, ">=", 0, "")]
        else:
            r = results[LP]
            checks = [(f"{LP}/{REF} req/s", ratios[LP]["rps_vs_ref"], ">=", TARGET_RPS_RATIO, "{:.2f}x"),
                      (f"{LP} errors", (r.get("errors") or 0) + (r.get("non2xx") or 0), "<=", 0, "{:.0f}"),
                      *H.baseline_checks(comparison)]
        ok = H.verdict(checks)
        for t in targets:
            t.idle_rss_kib = sum(t.extra.get("idle_rss_kib", {}).values()) or None
        H.write_json(SCENARIO, args, targets, results, ratios, ok, args.json, skipped,
                     {"h2_upgrade": {"measured": LP_H2 in results, "note": h2_note,
                                     "probes": {k: {"request_line": v["echo"][0], "headers": v["echo"][1],
                                                    "connections": v["connections"]} for k, v in probes.items()}},
                      "wire": {k: {"version": v, "cipher": c} for k, (v, c) in wire.items()},
                      "identities": {"a": NAME_A, "b": NAME_B}, **H.baseline_json(args, comparison)})
    return 0


if __name__ == "__main__":
    H.main_wrapper(main)
