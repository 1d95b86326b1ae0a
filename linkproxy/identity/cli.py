"""
C{linkproxy-identity}: create a development trust domain, issue leaf certificates, and show what a
directory holds.

    linkproxy-identity init DIR [--trust-domain D]
    linkproxy-identity issue DIR NAME [--lifetime 24h]
    linkproxy-identity show DIR
    linkproxy-identity serve DIR [--listen DESC] [--token-review kubernetes|file:PATH] [--lifetime 24h] ...

C{serve} runs the identity service (L{linkproxy.identity.server}); its configuration errors are listed at
once and exit 78, as the proxy's do.

Expected failures (a bad name, an existing CA, a missing file) print one line on stderr and exit 1; usage
errors exit 2 (argparse's convention).
"""

import argparse
import datetime
import re
import sys

from linkproxy.identity import ca

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text):
    """
    Parse C{"90s"}, C{"30m"}, C{"24h"}, C{"7d"} or a bare number of seconds.

    @return: a positive C{timedelta}.
    @raise argparse.ArgumentTypeError: for anything else.
    """
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 90s, 30m, 24h, 7d")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be positive")
    return datetime.timedelta(seconds=seconds)


def _parser():
    parser = argparse.ArgumentParser(
        prog="linkproxy-identity",
        description="Manage linkproxy identities: development trust domains, and the identity service.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create a trust anchor and an issuer in DIR")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--trust-domain", default=ca.DEFAULT_TRUST_DOMAIN, metavar="D",
                      help="trust domain (default: %(default)s)")

    issue = sub.add_parser("issue", help="write cert.pem and key.pem for NAME in DIR")
    issue.add_argument("dir", metavar="DIR")
    issue.add_argument("name", metavar="NAME",
                       help="<account>.<namespace>.serviceaccount.identity.<trust-domain>")
    issue.add_argument("--lifetime", type=parse_duration, default=ca.DEFAULT_LEAF_LIFETIME,
                       help="leaf lifetime, e.g. 24h (default)")

    show = sub.add_parser("show", help="describe the certificates in DIR")
    show.add_argument("dir", metavar="DIR")

    serve = sub.add_parser("serve", help="run the identity service, signing CSRs with DIR's issuer")
    serve.add_argument("dir", metavar="DIR", help="holds ca.pem, issuer.pem and issuer-key.pem")
    # Values stay text here: the server checks them all and lists every problem at once.
    serve.add_argument("--listen", default="tcp:8080", metavar="DESC",
                       help="gRPC (TLS) listener (default: %(default)s)")
    serve.add_argument("--admin", default="tcp:9990:interface=127.0.0.1", metavar="DESC",
                       help="admin listener: /live /ready /metrics (default: %(default)s)")
    serve.add_argument("--token-review", default="kubernetes", metavar="kubernetes|file:PATH",
                       help="how tokens are checked (default: %(default)s)")
    serve.add_argument("--lifetime", default="24h", help="leaf lifetime (default: %(default)s)")
    serve.add_argument("--namespace", default=None, metavar="NS",
                       help="namespace in the service's own identity (default: the pod's, else linkproxy)")
    serve.add_argument("--identity-name", default=None, metavar="NAME",
                       help="the service's own identity (default: "
                            "identity.<namespace>.serviceaccount.identity.<trust-domain>)")
    serve.add_argument("--audience", default="identity.linkproxy.io",
                       help="audience tokens must be valid for (default: %(default)s)")
    serve.add_argument("--kubeconfig", default=None, metavar="PATH",
                       help="kubeconfig for the TokenReview API (default: $KUBECONFIG, else in-cluster)")
    serve.add_argument("--rate-limit", default="10/1m", metavar="BURST/PERIOD",
                       help="requests per identity: BURST at once, BURST per PERIOD (default: %(default)s)")
    serve.add_argument("--log-level", default="info", help="debug, info, warn, error (default: %(default)s)")
    return parser


def main(argv=None, stdout=None, stderr=None):
    """
    Run the command line.

    @param argv: arguments without the program name; defaults to C{sys.argv[1:]}.
    @param stdout: where results go; defaults to C{sys.stdout}.
    @param stderr: where errors go; defaults to C{sys.stderr}.
    @return: the exit code (0 on success, 1 for an identity error, 2 for a usage error). Usage errors
        raise C{SystemExit(2)} from argparse, as console scripts expect.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from linkproxy.identity.server import run
        return run(args, stderr=stderr)
    try:
        if args.command == "init":
            anchor = ca.init_trust_domain(args.dir, args.trust_domain)
            print(f"created trust domain {args.trust_domain} in {args.dir} "
                  f"(anchor expires {anchor.not_valid_after_utc.isoformat()})", file=stdout)
        elif args.command == "issue":
            leaf = ca.issue_leaf(args.dir, args.name, args.lifetime)
            print(f"issued {args.name} in {args.dir} "
                  f"(expires {leaf.not_valid_after_utc.isoformat()})", file=stdout)
        else:
            print(ca.describe(args.dir), file=stdout)
    except ca.IdentityError as e:
        print(f"linkproxy-identity: error: {e}", file=stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
