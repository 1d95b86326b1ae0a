#!/usr/bin/env python3
"""
HTTP/1: wrk through linkproxy's outbound listener (as an HTTP proxy; Host names the backend as an IP literal)
and through its inbound listener (forwarding to the app), vs HAProxy `mode http` (nbthread 1) vs direct to the
nginx backend, in one run.

Targets, for each linkproxy hop: >= 0.40x HAProxy req/s at c=50; <= +150 us p50 over direct at c=1.

    .venv/bin/python bench/http1.py                 # full run (~1.5 min)
    .venv/bin/python bench/http1.py --no-linkproxy  # references only
    .venv/bin/python bench/http1.py --rounds 3 --baseline DIR  # A/B against the checkout in DIR
"""

import _harness as H

SCENARIO = "http1"
TARGET_RPS_RATIO = 0.40
TARGET_ADDED_P50_US = 150.0
TARGET_IDLE_RSS_MIB = 45.0  # reported, not part of this scenario's targets


def main():
    args = H.common_args(__doc__).parse_args()
    H.ensure_tools(("haproxy", "nginx", "wrk"))
    H.print_header(SCENARIO, args)
    with H.Harness(keep_tmp=args.keep_tmp, pin=args.pin) as h:
        _nginx, backend, _ = h.start_nginx()
        authority = f"{H.LOCALHOST}:{backend}"
        hdrs = (f"Host: {authority}",)
        targets = [H.Target("direct", "direct", backend, headers=hdrs, host=authority)]
        hp, hport = h.start_haproxy("http", backend)
        targets.append(H.Target("haproxy", "haproxy", hport, proc=hp, headers=hdrs, host=authority,
                                idle_rss_kib=H.rss_kib(hp.pid)))
        lp = None
        lp_names = []
        if not args.no_linkproxy:
            lp = h.start_linkproxy(app_port=backend, env=args.lp_env, args=args.lp_arg,
                                   timeout=args.startup_timeout)
            H.log(f"linkproxy ready; idle RSS {lp.idle_rss_kib / 1024:.1f} MiB")
            sides = [("", lp)]
            if args.baseline:
                base = h.start_linkproxy(app_port=backend, env=args.lp_env, args=args.lp_arg,
                                         timeout=args.startup_timeout, repo=args.baseline)
                H.log(f"baseline linkproxy ready; idle RSS {base.idle_rss_kib / 1024:.1f} MiB")
                sides.append((H.BASELINE, base))
            for hop, attr in (("out", "out_port"), ("in", "in_port")):  # each hop next to its baseline
                for suffix, p in sides:
                    targets.append(H.Target(f"linkproxy-{hop}{suffix}", "linkproxy", getattr(p, attr), proc=p.proc,
                                            headers=hdrs, host=authority, idle_rss_kib=p.idle_rss_kib))
            lp_names = ["linkproxy-out", "linkproxy-in"]
        targets, skipped = H.smoke_all(targets, H.check_http, args.keep_going)
        results = H.run_rounds(targets, args.rounds, lambda t: H.measure_wrk_target(t, args, h))
        ratios = H.report(targets, results)
        comparison = H.report_baseline(targets, results, args)
        checks = []
        for name in lp_names:
            checks += H.target_checks(name, results, ratios, skipped, TARGET_RPS_RATIO, TARGET_ADDED_P50_US)
        checks += H.baseline_checks(comparison)
        if lp is not None:
            H.print_kv("linkproxy idle RSS (info; tcp.py holds the target)", lp.idle_rss_kib / 1024,
                       "{:.1f} MiB (target <= %.0f MiB)" % TARGET_IDLE_RSS_MIB)
        ok = H.verdict(checks or [("linkproxy (--no-linkproxy)", None, ">=", 0, "")])
        H.write_json(SCENARIO, args, targets, results, ratios, ok, args.json, skipped,
                     {"linkproxy_idle_rss_kib": lp.idle_rss_kib if lp else None,
                      **H.baseline_json(args, comparison)})
    return 0


if __name__ == "__main__":
    H.main_wrapper(main)
