#!/usr/bin/env python3
"""
HTTP/2 (h2c, prior knowledge): h2load -c 10 -m 10 through linkproxy's outbound listener (:authority names the
nginx h2c backend as an IP literal) vs HAProxy `mode http` with `proto h2` on bind and server (nbthread 1) vs
direct to nginx, in one run.

Each run is bounded by a request count (-n): a short calibration run sizes -n so that the measured run lasts
about --duration seconds (clamped to [--min-requests, --max-requests]); --requests fixes -n instead.

Target: linkproxy >= 0.15x HAProxy req/s.

    .venv/bin/python bench/h2.py                 # full run (~1 min)
    .venv/bin/python bench/h2.py --no-linkproxy  # references only
    .venv/bin/python bench/h2.py --rounds 3 --baseline DIR  # A/B against the checkout in DIR
"""

import subprocess

import _harness as H

SCENARIO = "h2"
TARGET_RPS_RATIO = 0.15
CLIENTS, STREAMS = 10, 10


def check_h2(t, url, authority):
    """One request with nghttp (h2c prior knowledge) through the target; status 200 and the backend's body."""
    argv = [H.which("nghttp"), "-H", f":authority: {authority}", f"http://{H.LOCALHOST}:{t.port}/"]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        raise H.BenchError(f"{t.name}: h2c request timed out: {' '.join(argv)}") from None
    if p.returncode != 0 or p.stdout != H.BODY:
        raise H.BenchError(H.smoke_failure(t, f"h2c GET http://127.0.0.1:{t.port}/ (:authority {authority}) failed "
                                              f"(nghttp exit {p.returncode}): body {p.stdout[:200]!r} "
                                              f"{p.stderr.strip()[-500:]}"))


def measure_h2_target(t, args, h, url):
    cpus = h.load_cpus
    connect_to = None if t.kind == "direct" else f"{H.LOCALHOST}:{t.port}"
    logs = iter(range(1000))

    def logf():
        path = h.path(f"h2load-{t.name}-{next(logs)}.log")  # h2load appends: a fresh file per run
        if path.exists():
            path.unlink()
        return str(path)

    def go(clients, streams, n, log=None, timeout=None):
        if timeout is None:
            timeout = max(60.0, 4 * args.duration + 30)
        return H.run_h2load(url, clients, streams, n, connect_to=connect_to, cpus=cpus, logfile=log,
                            timeout=timeout)

    def size(rate, seconds):
        if args.requests:
            return args.requests
        return int(min(args.max_requests, max(args.min_requests, rate * seconds)))

    cal = go(CLIENTS, STREAMS, 2000)
    rate = cal["rps"]
    if args.warmup > 0:
        rate = go(CLIENTS, STREAMS, size(rate, args.warmup))["rps"]
    before = H.sample(t.proc.pid) if t.proc else None
    thr = go(CLIENTS, STREAMS, size(rate, args.duration), log=logf())
    after = H.sample(t.proc.pid) if t.proc else None
    lcal = go(1, 1, 200)
    lat = go(1, 1, size(lcal["rps"], args.latency_duration) if not args.requests
             else min(args.requests, 20000), log=logf())
    res = {
        "rps": thr["rps"], "requests": thr["requests"],
        "p50_c50_us": thr["p50_us"], "p99_c50_us": thr["p99_us"],
        "p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "rps_c1": lat["rps"],
        "errors": thr["errors"] + lat["errors"], "non2xx": thr["non2xx"] + lat["non2xx"],
    }
    if t.proc:
        cpu = after.cpu_s - before.cpu_s
        res.update(cpu_s=cpu, cpu_us_per_req=cpu * 1e6 / max(1, thr["requests"]),
                   cpu_util=cpu / max(1e-9, thr.get("elapsed_s") or args.duration),
                   rss_before_kib=before.rss_kib, rss_after_kib=after.rss_kib)
    return res


def main():
    ap = H.common_args(__doc__)
    ap.add_argument("--requests", type=int, default=0, help="fixed h2load -n for every throughput run")
    ap.add_argument("--min-requests", type=int, default=2000, help="lower bound of the sized -n (default %(default)s)")
    ap.add_argument("--max-requests", type=int, default=1_000_000,
                    help="upper bound of the sized -n (default %(default)s)")
    args = ap.parse_args()
    args.load_label = f"h2load -c {CLIENTS} -m {STREAMS}"  # --connections does not apply here
    H.ensure_tools(("haproxy", "nginx", "h2load"))
    H.print_header(SCENARIO, args)
    with H.Harness(keep_tmp=args.keep_tmp, pin=args.pin) as h:
        _nginx, _backend, h2port = h.start_nginx(h2=True)
        authority = f"{H.LOCALHOST}:{h2port}"
        url = f"http://{authority}/"
        targets = [H.Target("direct", "direct", h2port)]
        hp, hport = h.start_haproxy("http", h2port, h2=True)
        targets.append(H.Target("haproxy", "haproxy", hport, proc=hp, idle_rss_kib=H.rss_kib(hp.pid)))
        lp = None
        if not args.no_linkproxy:
            lp = h.start_linkproxy(app_port=h2port, env=args.lp_env, args=args.lp_arg, timeout=args.startup_timeout)
            H.log(f"linkproxy ready; idle RSS {lp.idle_rss_kib / 1024:.1f} MiB")
            targets.append(H.Target("linkproxy-out", "linkproxy", lp.out_port, proc=lp.proc,
                                    idle_rss_kib=lp.idle_rss_kib))
            if args.baseline:
                base = h.start_linkproxy(app_port=h2port, env=args.lp_env, args=args.lp_arg,
                                         timeout=args.startup_timeout, repo=args.baseline)
                H.log(f"baseline linkproxy ready; idle RSS {base.idle_rss_kib / 1024:.1f} MiB")
                targets.append(H.Target("linkproxy-out" + H.BASELINE, "linkproxy", base.out_port, proc=base.proc,
                                        idle_rss_kib=base.idle_rss_kib))
        targets, skipped = H.smoke_all(targets, lambda t: check_h2(t, url, authority), args.keep_going)
        results = H.run_rounds(targets, args.rounds, lambda t: measure_h2_target(t, args, h, url))
        ratios = H.report(targets, results, latency_label="h2load -c 1 -m 1")
        comparison = H.report_baseline(targets, results, args)
        checks = []
        if lp is not None:
            checks = H.target_checks("linkproxy-out", results, ratios, skipped, TARGET_RPS_RATIO)
            if "linkproxy-out" in results:
                H.print_kv("linkproxy added p50 vs direct (c=1 m=1)", ratios["linkproxy-out"]["added_p50_us"],
                           "{:+.0f} us")
            checks += H.baseline_checks(comparison)
        ok = H.verdict(checks or [("linkproxy (--no-linkproxy)", None, ">=", 0, "")])
        H.write_json(SCENARIO, args, targets, results, ratios, ok, args.json, skipped,
                     {"linkproxy_idle_rss_kib": lp.idle_rss_kib if lp else None,
                      **H.baseline_json(args, comparison)})
    return 0


if __name__ == "__main__":
    H.main_wrapper(main)
