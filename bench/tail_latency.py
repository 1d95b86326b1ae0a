#!/usr/bin/env python3
"""
Tail latency under a slow backend: Linkerd's "Beyond Round Robin" experiment at a scale 2 cores can run.

11 HTTP/1 backends (one Twisted process, bench/_tail_backend.py) answer after a lognormal delay (median 10 ms,
p99 50 ms, fixed seed). An open-loop generator (bench/_openloop.py) sends a fixed rate of requests through
linkproxy's outbound listener with `Host: web.default:80`, which `file:` discovery resolves to the 11 backends.
For each balancer, two runs: "no-fault", and "fault", in which backend 0 adds 1 s to every request arriving
during the middle 50% of the measured window (on the backend process's own clock). Latency is measured from
each request's scheduled send time.

Targets:
  - p2c-ewma fault p99 <= 1.25x p2c-ewma no-fault p99 (a slow endpoint barely shows);
  - p2c-ewma fault p99.9 <= 1/5 of round-robin's fault p99.9.

    .venv/bin/python bench/tail_latency.py                      # 4 balancers x 2 scenarios, 20 s each (~3.5 min)
    .venv/bin/python bench/tail_latency.py --direct             # plus client-side round-robin, no proxy
    .venv/bin/python bench/tail_latency.py --no-linkproxy       # only the direct baseline (tests the harness)
    .venv/bin/python bench/tail_latency.py --duration 10 --balancers p2c-ewma,round-robin

Prints a table, the verdict lines and the same table as Markdown; writes bench/out/tail_latency.json.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import _harness as H

SCENARIO = "tail_latency"
BALANCERS = ("p2c-ewma", "round-robin", "least-request", "random")
SCENARIOS = ("no-fault", "fault")
SERVICE = "web.default:80"
P99_RATIO_TARGET = 1.25  # p2c-ewma fault p99 / p2c-ewma no-fault p99
P999_RATIO_TARGET = 0.2  # p2c-ewma fault p99.9 / round-robin fault p99.9
PCTS = (50, 90, 95, 99, 99.9)
BACKEND_SCRIPT = H.BENCH_DIR / "_tail_backend.py"
OPENLOOP_SCRIPT = H.BENCH_DIR / "_openloop.py"
VENV_PYTHON = H.REPO / ".venv" / "bin" / "python"
DEFAULT_JSON = H.OUT_DIR / "tail_latency.json"
# Seconds between deciding the start time and the start of the warmup: room for the generator's interpreter
# and Twisted to start (about 0.5 s here) and for the smoke request.
START_MARGIN = 2.5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load first (default 2)")
    ap.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second (default %(default)s)")
    ap.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform",
                    help="request spacing: constant (default) or Poisson")
    ap.add_argument("--balancers", default=",".join(BALANCERS), help="comma-separated (default: all four)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: no-fault,fault")
    ap.add_argument("--backends", type=int, default=11, help="number of backends (default %(default)s)")
    ap.add_argument("--median-ms", type=float, default=10.0, help="backend latency median (default 10)")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="backend latency p99 (default 50)")
    ap.add_argument("--seed", type=int, default=1, help="backend latency seed (default 1)")
    ap.add_argument("--fault-delay", type=float, default=1.0, help="seconds the slow backend adds (default 1)")
    ap.add_argument("--fault-window", default="0.25,0.75",
                    help="fault start,end as fractions of the measured window (default 0.25,0.75)")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds (default 5)")
    ap.add_argument("--max-conns", type=int, default=256, help="generator connection bound (default 256)")
    ap.add_argument("--direct", action="store_true",
                    help="also run the direct baseline: the generator round-robins over the backends, no proxy")
    ap.add_argument("--no-linkproxy", action="store_true", help="only the direct baseline")
    ap.add_argument("--pin", action="store_true",
                    help="pin generator+backends to CPU 0 and linkproxy to CPU 1")
    ap.add_argument("--lp-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for linkproxy (repeatable)")
    ap.add_argument("--lp-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `twist linkproxy` (repeatable)")
    ap.add_argument("--keep-going", action="store_true",
                    help="skip a balancer whose smoke request fails instead of stopping (verdict INCOMPLETE)")
    ap.add_argument("--startup-timeout", type=float, default=30, help="seconds to wait for linkproxy /ready")
    ap.add_argument("--json", metavar="PATH", default=str(DEFAULT_JSON), help="JSON output (default %(default)s)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with configs, logs, raw results")
    args = ap.parse_args(argv)
    args.balancers = [b.strip() for b in args.balancers.split(",") if b.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {', '.join(bad)}; expected {', '.join(SCENARIOS)}")
    try:
        lo, hi = (float(x) for x in args.fault_window.split(","))
    except ValueError:
        ap.error("--fault-window: expected START,END fractions such as 0.25,0.75")
    if not 0 <= lo < hi <= 1:
        ap.error("--fault-window: need 0 <= start < end <= 1")
    args.fault_frac = (lo, hi)
    if args.duration <= 0 or args.rate <= 0 or args.backends < 2:
        ap.error("--duration and --rate must be positive, --backends at least 2")
    if args.no_linkproxy:
        args.direct = True
    return args


# --------------------------------------------------------------------------------------------------------------
# statistics


def percentile(sorted_vals, pct):
    """Nearest-rank percentile: the smallest value with at least pct% of the values at or below it."""
    if not sorted_vals:
        return None
    # round() first: 99.9 / 100 * 4000 is 3996.0000000000005 in floating point, and must be rank 3996.
    k = max(0, min(len(sorted_vals) - 1, math.ceil(round(pct / 100.0 * len(sorted_vals), 6)) - 1))
    return sorted_vals[k]


def summarize(doc, fault, args, fault_backend=0):
    """
    Latency percentiles (ms) over every measured request. A failed request ranks slower than every successful
    one (its latency counts as infinite), so a balancer cannot improve its percentiles by failing fast; a
    percentile that lands on a failure is infinite (shown as "err").
    """
    rows = doc["rows"]
    ok = sorted(r[1] for r in rows if not r[3])
    n_err = len(rows) - len(ok)
    lat = ok + [math.inf] * n_err
    every = sorted(r[1] for r in rows)
    out = {
        "requests": len(rows),
        "errors": n_err,
        "errors_by_kind": doc.get("errors_by_kind", {}),
        "unfinished": doc.get("unfinished", 0),
        "max_ms": every[-1] * 1e3 if every else None,
        "mean_ok_ms": sum(ok) / len(ok) * 1e3 if ok else None,
        "generator": {"send_lag_ms": doc["send_lag_ms"], "cpu_util": doc["generator_cpu_util"],
                      "connections": doc["connections"], "queued": doc["counts"]["queued"],
                      "retries": doc["counts"]["retries"]},
    }
    for p in PCTS:
        v = percentile(lat, p)
        out[f"p{p:g}_ms"] = None if v is None else v * 1e3
    over = [r for r in rows if r[1] >= 0.5]
    out["over_500ms"] = len(over)
    served = {}
    for r in rows:
        served[r[4]] = served.get(r[4], 0) + 1
    out["served_by_backend"] = {str(k): v for k, v in sorted(served.items())}
    if fault:
        fs, fe = args.fault_frac[0] * args.duration, args.fault_frac[1] * args.duration
        win = [r for r in rows if fs <= r[0] < fe]
        wl = sorted(r[1] if not r[3] else math.inf for r in win)
        out["fault_window"] = {
            "start_s": fs, "end_s": fe, "requests": len(win),
            "to_slow_backend": sum(1 for r in win if r[4] == fault_backend),
            "p99_ms": None if not wl else percentile(wl, 99) * 1e3,
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# one run


def python_for_children():
    return str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)


def endpoints_yaml(ports):
    lines = ["services:", f'  "{SERVICE}":']
    for i, port in enumerate(ports):
        lines += [f"    - addr: {H.LOCALHOST}:{port}", f"      labels: {{pod: web-{i}}}", "      protocol: http1"]
    return "\n".join(lines) + "\n"


def wait_file(path, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if not proc.alive():
            raise H.BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        time.sleep(0.05)
    raise H.BenchError(f"{proc.name} did not become ready within {timeout:.0f}s:\n{proc.tail()}")


def smoke(port, proc=None, label=""):
    """A few GETs through the target; each must answer 200 from one of our backends."""
    for _ in range(3):
        try:
            status, body = H.http_get(port, "/", host=SERVICE, timeout=5.0)
        except OSError as e:
            what = f"GET http://{H.LOCALHOST}:{port}/ (Host: {SERVICE}) failed: {e}"
            break
        if status == 200 and body.startswith("tail-latency backend"):
            continue
        what = (f"GET http://{H.LOCALHOST}:{port}/ (Host: {SERVICE}) answered {status} {body[:200]!r}, "
                "expected 200 from a tail-latency backend")
        break
    else:
        return None
    msg = f"{label}: {what}"
    if proc is not None:
        msg += f"\n--- last lines of linkproxy's output ---\n{proc.tail()}\n---"
    return msg


def run_one(h, args, label, scenario, balancer=None):
    """
    One measured run: fresh backends (with or without the fault) and, for a balancer, a fresh linkproxy.

    Returns (summary dict, None) or (None, smoke failure message).
    """
    tag = f"{label}-{scenario}"
    fault = scenario == "fault"
    ports = [H.free_port() for _ in range(args.backends)]
    lp = None
    if balancer is not None:
        ep_file = h.path(f"endpoints-{tag}.yaml")
        ep_file.write_text(endpoints_yaml(ports))
        lp = h.start_linkproxy(app_port=ports[0], env=args.lp_env, timeout=args.startup_timeout,
                               args=["--discovery", f"file:{ep_file}", "--balancer", balancer, *args.lp_arg])
    try:
        # Decide the measured window now; the backend's fault schedule and the generator share it.
        t0 = time.time() + START_MARGIN + args.warmup
        fault_start, fault_end = t0 + args.fault_frac[0] * args.duration, t0 + args.fault_frac[1] * args.duration
        ready = h.path(f"backend-{tag}.ready")
        stats_file = h.path(f"backend-{tag}.stats.json")
        bargv = [python_for_children(), BACKEND_SCRIPT, "--ports", ",".join(map(str, ports)),
                 "--median-ms", args.median_ms, "--p99-ms", args.p99_ms, "--seed", args.seed,
                 "--ready-file", ready, "--stats-file", stats_file,
                 "--max-lifetime", START_MARGIN + args.warmup + args.duration + args.timeout + 120]
        if fault:
            bargv += ["--fault-backend", 0, "--fault-start", f"{fault_start:.6f}", "--fault-end", f"{fault_end:.6f}",
                      "--fault-delay", args.fault_delay]
        backend = h.start(f"backend-{tag}", bargv, cpus=h.load_cpus)
        try:
            wait_file(ready, backend)
            if lp is not None:
                problem = smoke(lp.out_port, lp.proc, f"linkproxy --balancer {balancer}")
            else:
                problem = smoke(ports[0], None, "backend")
            if problem:
                return None, problem
            if time.time() > t0 - args.warmup - 0.5:
                H.log(f"{tag}: setup took longer than the start margin; the warmup will be shortened")
            out = h.path(f"openloop-{tag}.json")
            gargv = [python_for_children(), OPENLOOP_SCRIPT, "--host", SERVICE, "--rate", args.rate,
                     "--duration", args.duration, "--warmup", args.warmup, "--start-at", f"{t0:.6f}",
                     "--timeout", args.timeout, "--max-conns", args.max_conns, "--arrivals", args.arrivals,
                     "--seed", args.seed, "--out", out]
            if lp is not None:
                gargv += ["--target", f"{H.LOCALHOST}:{lp.out_port}"]
            else:
                for p in ports:
                    gargv += ["--target", f"{H.LOCALHOST}:{p}"]
            before = H.sample(lp.proc.pid) if lp else None
            budget = START_MARGIN + args.warmup + args.duration + args.timeout + 60
            H.log(f"{tag}: {args.rate:g} req/s for {args.warmup:g}+{args.duration:g}s"
                  + (f" (backend 0 +{args.fault_delay:g}s from {args.fault_frac[0] * args.duration:g}s to "
                     f"{args.fault_frac[1] * args.duration:g}s)" if fault else ""))
            try:
                p = subprocess.run([str(a) for a in gargv], capture_output=True, text=True, timeout=budget,
                                   preexec_fn=H._affinity(h.load_cpus))
            except subprocess.TimeoutExpired:
                raise H.BenchError(f"load generator did not finish within {budget:.0f}s") from None
            after = H.sample(lp.proc.pid) if lp else None
            for proc in filter(None, (lp.proc if lp else None, backend)):
                if not proc.alive():
                    # A run whose proxy or backends died is not a measurement of the balancer.
                    raise H.BenchError(f"{tag}: {proc.name} exited with code {proc.popen.returncode} during the "
                                       f"run (a signal if negative).\n--- last lines of its output ---\n"
                                       f"{proc.tail()}")
            h.path(f"openloop-{tag}.log").write_text(p.stdout + p.stderr)
            if not out.exists():
                raise H.BenchError(f"load generator failed ({p.returncode}):\n{p.stdout}{p.stderr}")
            doc = json.loads(out.read_text())
            res = summarize(doc, fault, args)
            if lp is not None:
                cpu = after.cpu_s - before.cpu_s
                res["proxy"] = {"cpu_s": cpu, "cpu_us_per_req": cpu * 1e6 / max(1, res["requests"]),
                                "rss_after_kib": after.rss_kib}
        finally:
            backend.stop()
        if stats_file.exists():
            bstats = json.loads(stats_file.read_text())
            res["backend"] = {"requests": bstats["requests"], "faulted": bstats["faulted"],
                              "connections": bstats["connections"], "lateness_ms": bstats.get("lateness_ms", {})}
            res["slow_hits"] = sum(bstats["faulted"]) if fault else 0
        return res, None
    finally:
        if lp is not None:
            lp.proc.stop()


# --------------------------------------------------------------------------------------------------------------
# reporting


def fmt_ms(v):
    if v is None:
        return "-"
    if v == math.inf:
        return "err"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


TABLE_HEADERS = ["balancer", "scenario", "requests", "errors", "p50", "p90", "p95", "p99", "p99.9",
                 "max", "slow hits"]


def table_rows(results):
    rows = []
    for (label, scenario), r in results.items():
        rows.append([label, scenario, str(r["requests"]), str(r["errors"])]
                    + [fmt_ms(r[f"p{p:g}_ms"]) for p in PCTS]
                    + [fmt_ms(r["max_ms"]), str(r.get("slow_hits", "-")) if scenario == "fault" else "-"])
    return rows


DISTURBED_MS = 5.0


def _late(r, key):
    v = r.get("backend", {}).get("lateness_ms", {}).get(key)
    return "-" if v is None else f"{v:.1f}"


def is_disturbed(r):
    lag = r["generator"]["send_lag_ms"]["p99"] or 0.0
    late = r.get("backend", {}).get("lateness_ms", {}).get("p99") or 0.0
    return lag > DISTURBED_MS or late > DISTURBED_MS


def markdown(rows):
    out = ["| " + " | ".join(TABLE_HEADERS) + " |",
           "|" + "|".join(["---"] * 2 + ["---:"] * (len(TABLE_HEADERS) - 2)) + "|"]
    for row in rows:
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def _ordinal(k):
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _ratio(a, b):
    """a / b where an error-valued (infinite) a fails and an error-valued b makes a comparison meaningless."""
    if b == math.inf:
        return None if a == math.inf else 0.0
    return a / b


def _jsonable(v):
    """Infinite percentiles (landing on failed requests) become null in the JSON; the error counts say why."""
    if isinstance(v, float) and math.isinf(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def verdicts(results):
    """The two targets as H.verdict checks, and one TARGET line each with the values and the limit."""
    def get(label, scenario, key):
        r = results.get((label, scenario))
        return None if r is None else r.get(key)

    def ms(v):
        return "error" if v == math.inf else f"{v:.1f} ms"

    targets = [
        ("p2c-ewma fault p99 <= 1.25x its no-fault p99", "p2c-ewma fault p99 / no-fault p99", P99_RATIO_TARGET,
         get("p2c-ewma", "fault", "p99_ms"), get("p2c-ewma", "no-fault", "p99_ms")),
        ("p2c-ewma fault p99.9 <= 1/5 of round-robin's fault p99.9", "p2c-ewma fault p99.9 / round-robin fault p99.9",
         P999_RATIO_TARGET, get("p2c-ewma", "fault", "p99.9_ms"), get("round-robin", "fault", "p99.9_ms")),
    ]
    checks, lines = [], []
    for title, label, limit, value, reference in targets:
        ratio = None if value is None or not reference else _ratio(value, reference)
        checks.append((label, ratio, "<=", limit, "{:.2f}x"))
        if ratio is None:
            lines.append(f"TARGET {title}: INCOMPLETE (not measured, or the reference percentile is an error)")
        else:
            lines.append(f"TARGET {title}: {'PASS' if ratio <= limit else 'FAIL'} ({ms(value)} vs {ms(reference)}"
                         f" = {ratio:.2f}x; limit {ms(limit * reference)})")
    return checks, lines


def main():
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    runs = []
    if args.direct:
        runs += [("direct-rr", s, None) for s in args.scenarios]
    if not args.no_linkproxy:
        runs += [(b, s, b) for b in args.balancers for s in args.scenarios]
    per_run = START_MARGIN + args.warmup + args.duration + 2
    print(f"== linkproxy bench: {SCENARIO} ==  {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"   {args.backends} backends, lognormal latency median {args.median_ms:g} ms / p99 {args.p99_ms:g} ms "
          f"(seed {args.seed}); {args.rate:g} req/s open loop ({args.arrivals}), {args.duration:g}s measured "
          f"+ {args.warmup:g}s warmup per run")
    print(f"   fault: backend 0 +{args.fault_delay:g}s per request from {args.fault_frac[0]:.0%} to "
          f"{args.fault_frac[1]:.0%} of the window; {len(runs)} runs, about {len(runs) * per_run / 60:.1f} min; "
          f"pin {'on' if args.pin else 'off'}")
    busy = H.background_cpu()
    print(f"   background CPU before start: {busy:.0%} of {os.cpu_count()} CPUs"
          + ("  ** WARNING: something else is using the CPUs; expect noisy numbers **" if busy > 0.15 else ""))
    results, skipped = {}, {}
    with H.Harness(keep_tmp=args.keep_tmp, pin=args.pin) as h:
        for label, scenario, balancer in runs:
            if label in skipped:
                continue
            res, problem = run_one(h, args, label, scenario, balancer)
            if problem:
                if not args.keep_going:
                    raise H.BenchError(problem + "\n(--no-linkproxy measures only the direct baseline; "
                                       "--keep-going skips failing balancers)")
                H.log(f"skipping {label}: {problem}")
                skipped[label] = problem.splitlines()[0]
                continue
            results[(label, scenario)] = res
            g = res["generator"]
            H.log(f"{label} {scenario}: p50 {fmt_ms(res['p50_ms'])} p99 {fmt_ms(res['p99_ms'])} "
                  f"p99.9 {fmt_ms(res['p99.9_ms'])} ms, errors {res['errors']}, send lag p99 "
                  f"{g['send_lag_ms']['p99']} ms, generator CPU {g['cpu_util']:.1%}")
    rows = table_rows(results)
    H.print_table("Latency from scheduled send time, ms (nearest-rank percentiles; failed requests rank slowest, "
                  "'err' = the percentile is a failure; slow hits = requests that got the +1 s)", TABLE_HEADERS, rows)
    gen_rows = []
    for (label, scenario), r in results.items():
        g = r["generator"]
        proxy = r.get("proxy")
        gen_rows.append([label, scenario, f"{g['send_lag_ms']['p50']:.2f}", f"{g['send_lag_ms']['p99']:.2f}",
                         f"{g['send_lag_ms']['max']:.1f}", f"{g['cpu_util']:.1%}", str(g["connections"]["peak"]),
                         str(g["queued"]), str(g["retries"]),
                         _late(r, "p99"), _late(r, "max"),
                         "-" if not proxy else f"{proxy['cpu_us_per_req']:.0f}"])
    H.print_table("Harness health (send lag = actual minus scheduled send time; backend late = response written "
                  "after its drawn delay) and proxy CPU",
                  ["balancer", "scenario", "lag p50 ms", "lag p99 ms", "lag max ms", "gen CPU", "peak conns",
                   "queued", "retries", "be late p99", "be late max", "proxy CPU us/req"], gen_rows)
    disturbed = [f"{label}/{scenario}" for (label, scenario), r in results.items() if is_disturbed(r)]
    if disturbed:
        print(f"WARNING: the generator or the backends ran late by more than {DISTURBED_MS:g} ms at p99 in "
              f"{', '.join(disturbed)}: the machine was busy (CPU contention), and those runs' percentiles include "
              "it. Re-run on a quiet machine before trusting a FAIL.")
    for label, why in skipped.items():
        print(f"SKIPPED {label}: {why}")
    checks, lines = verdicts(results)
    n = int(round(args.rate * args.duration))
    if n:
        k = n - math.ceil(round(0.999 * n, 6)) + 1
        hits = f"{k - 1} request{'s' if k != 2 else ''}"
        print(f"NOTE: {n} requests a run, so p99.9 is the {_ordinal(k)}-slowest request: a fault run keeps its p99.9 "
              f"off the slow backend only if at most {hits} hit it (the 'slow hits' column). "
              "More samples: --duration or --rate.")
    print()
    for line in lines:
        print(line)
    ok = H.verdict(checks)
    print()
    print("Markdown (docs/tail-latency.md):")
    print()
    print(markdown(rows))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "scenario": SCENARIO,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "background_cpu": busy},
        "args": {k: v for k, v in vars(args).items()},
        "service": SERVICE,
        "runs": [dict(r, balancer=label, scenario=scenario) for (label, scenario), r in results.items()],
        "skipped": skipped,
        "targets": {"p2c_fault_p99_over_nofault_p99": {"value": checks[0][1], "max": P99_RATIO_TARGET},
                    "p2c_fault_p999_over_rr_fault_p999": {"value": checks[1][1], "max": P999_RATIO_TARGET}},
        "verdict": {True: "PASS", False: "FAIL", None: "INCOMPLETE"}[ok],
        "disturbed_runs": disturbed,
        "markdown": markdown(rows),
    }
    path.write_text(json.dumps(_jsonable(doc), indent=2, default=str) + "\n")
    H.log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    H.main_wrapper(main)
