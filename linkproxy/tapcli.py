"""
C{linkproxy-tap}: watch a running proxy's requests, one line each, as C{linkerd viz tap} does.

    linkproxy-tap [--admin URL] [--authority A] [--path P] [--method M] [--direction D] [--status S]
                  [--limit N] [--json]

It reads the admin server's C{/tap} stream (loopback only) and prints every finished request; C{--json}
prints the raw events. Ctrl-C exits cleanly (status 0).
"""

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


def format_event(event):
    """
    One C{linkerd viz tap}-like line for a tap event.
    """
    direction = {"outbound": "out", "inbound": "in"}.get(event.get("direction"), event.get("direction", "?"))
    parts = [
        f"proxy={direction}",
        f":method={event.get('method', '')}",
        f":authority={event.get('authority', '')}",
        f":path={event.get('path', '')}",
        f":status={event.get('status', '')}",
    ]
    if event.get("grpc_status") not in (None, ""):
        parts.append(f"grpc-status={event['grpc_status']}")
    parts += [
        f"latency={event.get('latency_ms', 0):g}ms",
        f"duration={event.get('duration_ms', 0):g}ms",
        f"dst={event.get('endpoint') or '-'}",
        f"tls={event.get('tls', '')}",
        f"client_id={event.get('client_id') or '-'}",
    ]
    if event.get("route") not in (None, "", "default"):
        parts.append(f"rt_route={event['route']}")
    if event.get("error"):
        parts.append(f"error={json.dumps(event['error'])}")
    if event.get("final") is False:
        parts.append(f"attempt={event.get('attempt')} (retried)")
    return " ".join(parts)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="linkproxy-tap", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--admin", default="http://127.0.0.1:4191", help="the proxy's admin server URL")
    for name in ("authority", "path", "method", "direction", "status"):
        parser.add_argument(f"--{name}", help=f"only requests with this {name}"
                            + (" (prefix)" if name == "path" else " (e.g. 503 or 5xx)" if name == "status" else ""))
    parser.add_argument("--limit", type=int, help="stop after this many requests")
    parser.add_argument("--json", action="store_true", help="print the raw events, one JSON object a line")
    return parser.parse_args(argv)


def tap_url(args):
    """
    The C{/tap} URL for the parsed arguments.
    """
    query = {name: getattr(args, name) for name in ("authority", "path", "method", "direction", "status", "limit")
             if getattr(args, name) is not None}
    url = args.admin.rstrip("/") + "/tap"
    return url + ("?" + urllib.parse.urlencode(query) if query else "")


def run(args, out=sys.stdout, err=sys.stderr):
    """
    Stream the events to C{out} until the proxy ends the stream.

    @return: the exit status.
    """
    try:
        response = urllib.request.urlopen(tap_url(args), timeout=None)
    except urllib.error.HTTPError as e:
        err.write(f"linkproxy-tap: {e.code} from {args.admin}: {e.read().decode('utf-8', 'replace').strip()}\n")
        return 1
    except (urllib.error.URLError, OSError) as e:
        err.write(f"linkproxy-tap: cannot reach {args.admin}: {getattr(e, 'reason', e)}\n")
        return 1
    kind = "message"
    with response:
        for raw in response:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                kind = "message"
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if kind == "lost":
                    err.write(f"linkproxy-tap: {data['lost']} events lost (this client read too slowly)\n")
                elif args.json:
                    out.write(json.dumps(data, separators=(",", ":")) + "\n")
                else:
                    out.write(format_event(data) + "\n")
                out.flush()
    return 0


def main(argv=None):
    """
    The console script.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sys.exit(run(args))
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:
        # The reader of our output (head, less) went away.
        sys.exit(0)
