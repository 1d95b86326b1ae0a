#!/usr/bin/env python3
"""
Opaque TCP: wrk (HTTP/1 over a plain TCP hop) through linkproxy's outbound `tcp_routes` listener vs HAProxy
`mode tcp` (nbthread 1) vs direct to the nginx backend, in one run.

Targets: linkproxy >= 0.45x HAProxy req/s at c=50; linkproxy idle RSS <= 45 MiB.

    .venv/bin/python bench/tcp.py                 # full run (~1 min)
    .venv/bin/python bench/tcp.py --no-linkproxy  # references only
"""

import _harness as H

SCENARIO = "tcp"
TARGET_RPS_RATIO = 0.45
TARGET_IDLE_RSS_MIB = 45.0


def main():
    args = H.common_args(__doc__).parse_args()
    H.ensure_tools(("haproxy", "nginx", "wrk"))
    H.print_header(SCENARIO, args)
    with H.Harness(keep_tmp=args.keep_tmp, pin=args.pin) as h:
        _nginx, backend, _ = h.start_nginx()
        targets = [H.Target("direct", "direct", backend)]
        hp, hport = h.start_haproxy("tcp", backend)
        targets.append(H.Target("haproxy", "haproxy", hport, proc=hp, idle_rss_kib=H.rss_kib(hp.pid)))
        lp = None
        if not args.no_linkproxy:
            lp = h.start_linkproxy(app_port=backend, tcp_target_port=backend, env=args.lp_env, args=args.lp_arg,
                                   timeout=args.startup_timeout)
            H.log(f"linkproxy ready; idle RSS {lp.idle_rss_kib / 1024:.1f} MiB")
            targets.append(H.Target("linkproxy-tcp", "linkproxy", lp.tcp_port, proc=lp.proc,
                                    idle_rss_kib=lp.idle_rss_kib))
            if args.baseline:
                base = h.start_linkproxy(app_port=backend, tcp_target_port=backend, env=args.lp_env,
                                         args=args.lp_arg, timeout=args.startup_timeout, repo=args.baseline)
                H.log(f"baseline linkproxy ready; idle RSS {base.idle_rss_kib / 1024:.1f} MiB")
                targets.append(H.Target("linkproxy-tcp" + H.BASELINE, "linkproxy", base.tcp_port, proc=base.proc,
                                        idle_rss_kib=base.idle_rss_kib))
        targets, skipped = H.smoke_all(targets, H.check_http, args.keep_going)
        results = H.run_rounds(targets, args.rounds, lambda t: H.measure_wrk_target(t, args, h))
        ratios = H.report(targets, results)
        comparison = H.report_baseline(targets, results, args)
        checks = []
        if lp is not None:
            checks = H.target_checks("linkproxy-tcp", results, ratios, skipped, TARGET_RPS_RATIO)
            checks.insert(1, ("idle RSS MiB", lp.idle_rss_kib / 1024, "<=", TARGET_IDLE_RSS_MIB, "{:.1f}"))
            if "linkproxy-tcp" in results:
                H.print_kv("linkproxy added p50 vs direct (c=1)", ratios["linkproxy-tcp"]["added_p50_us"],
                           "{:+.0f} us")
            checks += H.baseline_checks(comparison)
        ok = H.verdict(checks or [("linkproxy (--no-linkproxy)", None, ">=", 0, "")])
        H.write_json(SCENARIO, args, targets, results, ratios, ok, args.json, skipped,
                     {"linkproxy_idle_rss_kib": lp.idle_rss_kib if lp else None,
                      **H.baseline_json(args, comparison)})
    return 0


if __name__ == "__main__":
    H.main_wrapper(main)
