"""
C{twist linkproxy}: the command-line options and the service maker.

This is the only module that reads argv and the environment and that picks the reactor; everything else gets
a frozen L{Config} and a reactor passed in.
"""

import os
import sys

from twisted.python import usage

from linkproxy.config import OPTIONS, ConfigError, load_config


class Options(usage.Options):
    """
    Options for C{twist linkproxy}. Each has an environment twin C{LINKPROXY_<NAME>} and a key in the YAML file
    named by C{--config}; precedence is command line, then environment, then file, then default.
    """

    synopsis = "[options]"
    longdesc = ("A service-mesh sidecar proxy: outbound on 127.0.0.1:4140, inbound on :4143, "
                "admin on 127.0.0.1:4191. See docs/configuration.md.")
    optParameters = [
        [o.name.replace("_", "-"), None, None, f"{o.help} [default: {o.default_text}; env {o.env}]"]
        for o in OPTIONS
    ]

    def postOptions(self):
        # Runs before twist installs the reactor: the last moment to keep TLS libraries out of the process.
        cli = self.cli_values()
        if not tls_requested(cli, os.environ):
            leave_out_tls()
        leave_out_admin_h2()

    def cli_values(self):
        """
        @return: C{{option name: raw text or None}}, the mapping L{linkproxy.config.parse_config} takes.
        """
        return {o.name: self[o.name.replace("_", "-")] for o in OPTIONS}


def tls_requested(cli, env):
    """
    Whether this configuration can need TLS: identity is configured, or some endpoint description is C{ssl:}.

    A cheap look at the raw sources, before the full parse: any doubt (an unreadable file) answers C{True}.
    """
    from linkproxy.config import CONFIG_ENV, ConfigError, read_config_file
    if cli.get("identity_dir") or env.get("LINKPROXY_IDENTITY_DIR"):
        return True
    texts = [v for v in cli.values() if isinstance(v, str)]
    texts += [v for k, v in env.items() if k.startswith("LINKPROXY_")]
    path = cli.get("config") or env.get(CONFIG_ENV)
    if path:
        try:
            document = read_config_file(path)
        except ConfigError:
            return True
        if any(str(key).replace("-", "_") == "identity_dir" for key in document):
            return True
        texts.append(repr(document))
    return any("ssl:" in text for text in texts)


def leave_out_tls():
    """
    Keep pyOpenSSL (and the cryptography bindings it pulls in) out of a process that will never speak TLS.

    Twisted imports pyOpenSSL with the reactor whenever it is installed, which costs about 12 MiB of the
    idle RSS; Twisted treats it as optional and works without it. A process without identity terminates no
    TLS and originates none (TLS from apps is passed through as opaque bytes), so it is marked absent.
    """
    import sys
    if "OpenSSL" not in sys.modules:
        sys.modules["OpenSSL"] = None


def leave_out_admin_h2():
    """
    Keep twisted.web's HTTP/2 server out of the admin server.

    twisted.web imports its HTTP/2 support (and so h2) whenever h2 is installed, which would load h2 at start
    in every proxy; the admin server has no use for HTTP/2, and the data path loads h2 itself with the first
    HTTP/2 client. Twisted treats the module as optional.
    """
    import sys
    if "twisted.web.http" not in sys.modules:
        sys.modules.setdefault("twisted.web._http2", None)


def check_plugins(config):
    """
    Problems with names that only the installed plugins can vouch for: the balancer and discovery backend.

    @return: a list of problem texts, empty when all is well.
    """
    from linkproxy.balancers import find_balancer
    from linkproxy.discovery import find_discovery
    problems = []
    try:
        find_balancer(config.balancer)
    except KeyError as e:
        problems.append(f"balancer: {e.args[0]}")
    try:
        find_discovery(config.discovery)
    except KeyError as e:
        problems.append(f"discovery: {e.args[0]}")
    if config.workers != 1:
        problems.append(f"workers: only 1 worker process is supported in this version, got {config.workers}")
    return problems


def configure(cli, env):
    """
    Build the effective configuration from every source, or raise L{ConfigError} listing every problem.
    """
    problems = []
    config = None
    try:
        config = load_config(cli, env)
    except ConfigError as e:
        problems.extend(e.problems)
    if config is not None:
        problems.extend(check_plugins(config))
    if problems:
        raise ConfigError(problems)
    return config


def makeService(options):
    """
    Build the proxy service. A bad configuration is reported in full and the process exits (status 78,
    EX_CONFIG) before anything is bound.
    """
    try:
        config = configure(options.cli_values(), os.environ)
    except ConfigError as e:
        sys.stderr.write(f"linkproxy: {e}\n")
        sys.stderr.flush()
        raise SystemExit(78)
    log_level = _install_logging(options, config)
    from twisted.internet import reactor
    from linkproxy.service import make_proxy_service
    if config.identity_dir is None:
        return make_proxy_service(config, reactor, log_level)
    from linkproxy.identity.ca import IdentityError
    try:
        return make_proxy_service(config, reactor, log_level)
    except IdentityError as e:
        sys.stderr.write(f"linkproxy: identity: {e}\n")
        sys.stderr.flush()
        raise SystemExit(78)


def _install_logging(options, config):
    """
    Make C{--log-format} the format, and C{--log-level} (and later C{PUT /proxy-log-level}) the level, of the
    whole process's log, Twisted's own events included.

    C{twist} builds its log observer only after this service exists, from the factory its options hold: its
    text format when the log file is a terminal, its JSON event dump otherwise, or whichever its own
    C{--log-format} (given before the plugin name) chose. That factory is replaced by one writing
    linkproxy's format (L{linkproxy.logformat}) to the same file (twist's C{--log-file}), so linkproxy's
    C{--log-format} wins over twist's: C{twist --log-format text linkproxy} writes plain lines too.

    C{twist} also filters events at its own C{--log-level} before anything else sees them. So its filter is
    opened fully and the observer is wrapped in linkproxy's run-time level filter; linkproxy's level
    therefore replaces twist's own C{--log-level}.

    Without C{twist} (C{options} has no parent holding an observer factory) nothing is installed.

    @return: the L{linkproxy.admin.loglevel.LogLevelControl}.
    """
    from twisted.logger import LogLevel
    from linkproxy.admin.loglevel import LogLevelControl
    from linkproxy.logformat import observer
    control = LogLevelControl(config.log_level, everything=True)
    parent = getattr(options, "parent", None)
    factory = parent.get("fileLogObserverFactory") if parent is not None else None
    if factory is not None:
        log_format = config.log_format
        parent["logLevel"] = LogLevel.debug
        parent["fileLogObserverFactory"] = lambda log_file: control.observer(observer(log_format, log_file))
    return control
