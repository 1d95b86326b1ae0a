"""
Turn every configuration source into one frozen L{Config}.

Sources, highest precedence first: command-line options, C{LINKPROXY_*} environment variables, the YAML config
file, built-in defaults. L{parse_config} is pure: it reads only the mappings it is given, checks every value,
and reports every problem at once in a single L{ConfigError}, so an operator fixes a broken deployment in one
round instead of one error per restart. L{read_config_file} is the only function here that does I/O.

The option table L{OPTIONS} drives the parsing, and C{tap.py} builds its C{usage.Options} from it, so an option
is added in one place.
"""

import difflib
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from linkproxy.core.endpoint import Address, format_address, parse_host_port

ENV_PREFIX = "LINKPROXY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

TcpRoute = Tuple[str, Address]
StaticEndpoint = Tuple[str, Address]

# Linkerd's default opaque ports: protocols where the server speaks first (SMTP, MySQL, Postgres, Redis, ...),
# so sniffing would stall until the detect timeout.
DEFAULT_OPAQUE_PORTS: FrozenSet[int] = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("plain", "json")
ACCESS_LOG_FORMATS = ("off", "apache", "json")
POLICY_MODES = ("unauthenticated", "authenticated", "deny", "allow")

_SENSITIVE_WORDS = ("key", "token", "secret", "password")
REDACTED = "<redacted>"


class ConfigError(Exception):
    """
    The configuration is unusable.

    @ivar problems: every problem found, each one line naming its source, what was expected and what was given.
    """

    def __init__(self, problems: Sequence[str]):
        self.problems: List[str] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        return "\n".join([f"invalid configuration ({count} {noun}):"] + [f"  - {p}" for p in self.problems])


@dataclass(frozen=True)
class Config:
    """
    The effective configuration of one proxy. Build it with L{parse_config}; the defaults here are the
    defaults of the option table.

    @ivar outbound: server endpoint description of the outbound listener.
    @ivar inbound: server endpoint description of the inbound listener.
    @ivar admin: server endpoint description of the admin server.
    @ivar app: client endpoint description of the local application, for inbound traffic.
    @ivar tcp_routes: C{(listen description, (host, port))} pairs: extra outbound listeners whose connections
        all go to one fixed target.
    @ivar detect_timeout: seconds to wait for enough bytes to detect the protocol before treating it as opaque.
    @ivar connect_timeout: seconds allowed for a TCP (and TLS) connection to an endpoint.
    @ivar response_timeout: seconds allowed from sending a request to receiving the response head.
    @ivar shutdown_grace_period: seconds to let connections drain on shutdown.
    @ivar opaque_ports: target ports never sniffed; traffic to them is proxied as opaque TCP.
    @ivar log_level: one of L{LOG_LEVELS}.
    @ivar log_format: how log events are written, one of L{LOG_FORMATS}.
    @ivar access_log: the per-request access log format, one of L{ACCESS_LOG_FORMATS}; C{"off"} writes none.
    @ivar access_log_file: where the access log goes, or C{None} for standard error.
    @ivar discovery: the discovery spec as given: C{dns}, C{file:PATH}, C{static:...} or a plugin name.
    @ivar static_endpoints: for C{static:} discovery, C{(logical name "host:port", (host, port))} pairs.
    @ivar balancer: balancer name, checked against installed plugins later.
    @ivar identity_dir: directory holding this proxy's trust anchors and credentials, or C{None}.
    @ivar identity_name: this proxy's identity, or C{None}. Set together with C{identity_dir}.
    @ivar identity_service: C{"host:port"} of the identity service that certifies this proxy, or C{None}
        (then the identity comes from C{identity_dir}'s files or its issuer).
    @ivar identity_service_name: the identity the identity service must prove; when not given,
        C{identity.linkproxy.serviceaccount.identity.<trust domain of identity_name>}.
    @ivar identity_token_file: the token sent to the identity service, read afresh for every request.
    @ivar policy: inbound authorization mode, one of L{POLICY_MODES}.
    @ivar policy_allow: the identities allowed when C{policy} is C{"allow"}; empty otherwise.
    @ivar h2_upgrade: carry HTTP/1 between proxies as HTTP/2.
    @ivar max_header_bytes: largest request or response head accepted, in bytes.
    @ivar pool_idle_timeout: seconds an idle pooled connection is kept.
    @ivar pool_max_idle: idle pooled connections kept per endpoint.
    @ivar workers: number of reactor processes.
    @ivar dst_override: honour the C{l5d-dst-override} request header.
    @ivar config_file: path of the YAML file the configuration was read from, or C{None}.
    """

    outbound: str = "tcp:4140:interface=127.0.0.1"
    inbound: str = "tcp:4143"
    admin: str = "tcp:4191:interface=127.0.0.1"
    app: str = "tcp:host=127.0.0.1:port=8080"
    tcp_routes: Tuple[TcpRoute, ...] = ()
    detect_timeout: float = 10.0
    connect_timeout: float = 1.0
    response_timeout: float = 10.0
    shutdown_grace_period: float = 30.0
    opaque_ports: FrozenSet[int] = field(default=DEFAULT_OPAQUE_PORTS)
    log_level: str = "info"
    log_format: str = "plain"
    access_log: str = "off"
    access_log_file: Optional[str] = None
    discovery: str = "dns"
    static_endpoints: Tuple[StaticEndpoint, ...] = ()
    balancer: str = "p2c-ewma"
    identity_dir: Optional[str] = None
    identity_name: Optional[str] = None
    identity_service: Optional[str] = None
    identity_service_name: Optional[str] = None
    identity_token_file: Optional[str] = None
    policy: str = "unauthenticated"
    policy_allow: Tuple[str, ...] = ()
    h2_upgrade: bool = False
    max_header_bytes: int = 65536
    pool_idle_timeout: float = 3.0
    pool_max_idle: int = 256
    workers: int = 1
    dst_override: bool = False
    config_file: Optional[str] = None

    def redacted(self) -> Dict[str, Any]:
        """
        The effective configuration as JSON-serialisable data, for the admin server's C{/env.json}.

        Values of any key whose name contains C{key}, C{token}, C{secret} or C{password} are replaced by
        L{REDACTED}. Paths (such as C{identity_dir}) are shown; file contents never are.
        """
        data: Dict[str, Any] = {}
        for f in fields(self):
            data[f.name] = _jsonable(getattr(self, f.name))
        data["opaque_ports"] = sorted(self.opaque_ports)
        data["tcp_routes"] = [{"listen": listen, "target": format_address(target)}
                              for listen, target in self.tcp_routes]
        data["static_endpoints"] = [{"name": name, "address": format_address(addr)}
                                    for name, addr in self.static_endpoints]
        return redact(data)


def redact(data: Any) -> Any:
    """
    Copy C{data} (nested dicts and lists), replacing the value of every key whose name contains C{key},
    C{token}, C{secret} or C{password} (case-insensitive) with L{REDACTED}. C{None} stays C{None}, so an
    operator can still see that a secret is unset.
    """
    if isinstance(data, Mapping):
        out = {}
        for k, v in data.items():
            if v is not None and any(word in str(k).lower() for word in _SENSITIVE_WORDS):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# Value parsers. Each takes a raw value (text from the CLI or environment, or any YAML value) and returns the
# parsed value, or raises ValueError with "expected ..., got ..." for the operator.


def _show(value: Any) -> str:
    """
    Describe a given value for an error message, briefly enough to fit on one line.
    """
    if isinstance(value, str):
        if len(value) > 80:
            return repr(value[:77]) + "..."
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a value of type {type(value).__name__}"


def _text(value: Any, expected: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {expected}, got {_show(value)}")
    return value.strip()


class _NoReactor:
    """
    Stands in for the reactor while endpoint descriptions are checked: constructing a tcp or unix endpoint
    only stores the reactor, so any use of it means the description would do real work at parse time.
    """

    def __getattr__(self, name: str) -> Any:
        # AttributeError rather than anything louder: zope.interface probes for attributes such as
        # __providedBy__ and only tolerates AttributeError.
        raise AttributeError(f"endpoint description used the reactor ({name}) while being checked")


def _description(value: Any, parse: Callable[[Any, str], Any], example: str, what: str, lowest_port: int) -> str:
    desc = _text(value, f"a {example}")
    try:
        endpoint = parse(_NoReactor(), desc)
    except Exception as e:
        # Endpoint parsers (including third-party plugins) fail with whatever they like: ValueError, TypeError,
        # KeyError, OSError for missing certificate files... All of them mean "bad description".
        raise ValueError(f"invalid {what} {_show(desc)}: {_exception_text(e)}") from None
    from linkproxy.net.twisted_private import endpoint_port
    port = endpoint_port(endpoint)
    if port is not None and not lowest_port <= port <= 65535:
        raise ValueError(f"invalid {what} {_show(desc)}: port {port} is outside {lowest_port}-65535")
    return desc


def _server_description(value: Any, what: str = "listen address") -> str:
    from twisted.internet.endpoints import serverFromString
    # Port 0 asks the kernel for a free port: fine for a listener.
    return _description(value, serverFromString,
                        "server endpoint description such as 'tcp:4140:interface=127.0.0.1'", what, 0)


def _client_description(value: Any) -> str:
    from twisted.internet.endpoints import clientFromString
    return _description(value, clientFromString,
                        "client endpoint description such as 'tcp:host=127.0.0.1:port=8080'", "client address", 1)


def _exception_text(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(allow_zero: bool) -> Callable[[Any], float]:
    bound = ">= 0" if allow_zero else "> 0"
    expected = f"a duration {bound} such as 10, 10s, 1.5s or 500ms"

    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected}, got {_show(value)}")
        try:
            if isinstance(value, (int, float)):
                seconds = float(value)
            elif isinstance(value, str):
                match = _DURATION.fullmatch(value.strip().lower())
                if match is None:
                    raise ValueError
                seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
            else:
                raise ValueError
        except (ValueError, OverflowError):
            raise ValueError(f"expected {expected}, got {_show(value)}") from None
        if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return seconds

    return parse


_INTEGER = re.compile(r"[0-9]{1,18}")


def _to_int(value: Any) -> int:
    """
    Accept an int from YAML or decimal digits from text; raise ValueError otherwise.
    """
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise ValueError


def _integer(low: int, high: Optional[int]) -> Callable[[Any], int]:
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(value: Any) -> int:
        try:
            number = _to_int(value)
        except ValueError:
            raise ValueError(f"expected {expected}, got {_show(value)}") from None
        if number < low or (high is not None and number > high):
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return number

    return parse


_TRUE = frozenset({"on", "true", "yes", "1"})
_FALSE = frozenset({"off", "false", "no", "0"})


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(f"expected on/off, true/false, yes/no or 1/0, got {_show(value)}")


def _port_number(text: str) -> int:
    number = _to_int(text)
    if not 1 <= number <= 65535:
        raise ValueError
    return number


def _opaque_ports(value: Any) -> FrozenSet[int]:
    expected = "a comma-separated list of ports 1-65535 or ranges such as 25,587,8000-8010"
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [] if not value.strip() else value.split(",")
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise ValueError(f"expected {expected}, got {_show(value)}")
    ports = set()
    bad = []
    for item in items:
        try:
            if isinstance(item, str) and "-" in item:
                low_text, _, high_text = item.partition("-")
                low, high = _port_number(low_text), _port_number(high_text)
                if low > high:
                    raise ValueError
                ports.update(range(low, high + 1))
            else:
                ports.add(_port_number(item))
        except ValueError:
            bad.append(_show(item.strip() if isinstance(item, str) else item))
    if bad:
        raise ValueError(f"expected {expected}, got {', '.join(bad)}")
    return frozenset(ports)


def _log_level(value: Any) -> str:
    level = _text(value, "one of " + ", ".join(LOG_LEVELS)).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {_show(value)}")
    return level


def _choice(choices: Tuple[str, ...]) -> Callable[[Any], str]:
    expected = "one of " + ", ".join(choices)

    def parse(value: Any) -> str:
        # YAML reads a bare off as false; accept it as the word it was written as.
        if value is False and "off" in choices:
            return "off"
        choice = _text(value, expected).lower()
        if choice not in choices:
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return choice

    return parse


_PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def _plugin_name(value: Any) -> str:
    expected = "a name of lowercase letters, digits, '-' and '_', starting with a letter"
    name = _text(value, expected)
    if not _PLUGIN_NAME.fullmatch(name):
        raise ValueError(f"expected {expected}, got {_show(value)}")
    return name


def _address(text: str) -> Address:
    # parse_host_port's messages already quote the text and say what was expected.
    return parse_host_port(text)


def _discovery(value: Any) -> Tuple[str, Tuple[StaticEndpoint, ...]]:
    expected = "'dns', 'dns:SERVER_IP[:PORT]', 'file:PATH', 'static:NAME=ADDR,...' or a plugin name"
    spec = _text(value, expected)
    if spec.startswith("dns:"):
        server = spec[len("dns:"):]
        try:
            host, _ = parse_host_port(server, 53)
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"expected 'dns:SERVER_IP[:PORT]' naming a DNS server by IP address, "
                             f"got {_show(value)}") from None
        return spec, ()
    if spec.startswith("file:"):
        if not spec[len("file:"):].strip():
            raise ValueError(f"expected a path after 'file:', got {_show(value)}")
        return spec, ()
    if spec.startswith("static:"):
        body = spec[len("static:"):]
        if not body.strip():
            raise ValueError(f"expected 'static:NAME=ADDR,...' with at least one entry, got {_show(value)}")
        entries = []
        bad = []
        for item in body.split(","):
            name, sep, addr = item.partition("=")
            try:
                if not sep:
                    raise ValueError(f"expected NAME=ADDR with both as host:port, got {_show(item.strip())}")
                entries.append((format_address(_address(name)), _address(addr)))
            except ValueError as e:
                bad.append(f"static entry {_show(item.strip())}: {e}")
        if bad:
            raise ValueError("; ".join(bad))
        return spec, tuple(entries)
    if _PLUGIN_NAME.fullmatch(spec):
        return spec, ()
    raise ValueError(f"expected {expected}, got {_show(value)}")


_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_IDENTITY_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*", re.ASCII)


def _identity(text: str) -> str:
    name = text.strip()
    if len(name) > 253 or not _IDENTITY_NAME.fullmatch(name):
        raise ValueError(
            "expected a DNS-like name (lowercase letters, digits, '-' and '.', labels of 1-63 characters, "
            f"at most 253 in all), got {_show(text)}")
    return name


def _identity_name(value: Any) -> Optional[str]:
    if value is None:
        return None
    return _identity(_text(value, "a DNS-like identity name"))


def _service_address(value: Any) -> Optional[str]:
    if value is None:
        return None
    return format_address(_address(_text(value, "a host:port")))


def _path(value: Any) -> Optional[str]:
    if value is None:
        return None
    path = _text(value, "a path")
    if not path:
        raise ValueError("expected a path, got ''")
    return path


def _policy(value: Any) -> Tuple[str, Tuple[str, ...]]:
    expected = "'unauthenticated', 'authenticated', 'deny' or 'allow:ID1,ID2,...'"
    spec = _text(value, expected)
    if spec in ("unauthenticated", "authenticated", "deny"):
        return spec, ()
    if spec.startswith("allow:"):
        names = [n.strip() for n in spec[len("allow:"):].split(",")]
        if not any(names):
            raise ValueError(f"expected 'allow:' followed by at least one identity, got {_show(value)}")
        allowed: List[str] = []
        for name in names:
            checked = _identity(name)
            if checked not in allowed:
                allowed.append(checked)
        return "allow", tuple(allowed)
    raise ValueError(f"expected {expected}, got {_show(value)}")


def _tcp_route(item: Any) -> TcpRoute:
    if isinstance(item, Mapping):
        unknown = sorted(str(k) for k in item if k not in ("listen", "target"))
        if unknown:
            raise ValueError(f"unknown keys {', '.join(map(repr, unknown))} (expected 'listen' and 'target')")
        if "listen" not in item or "target" not in item:
            raise ValueError("expected a mapping with both 'listen' and 'target'")
        listen, target = item["listen"], item["target"]
    elif isinstance(item, str):
        listen, sep, target = item.partition("->")
        if not sep:
            raise ValueError(f"expected LISTEN_DESC->host:port, got {_show(item.strip())}")
    else:
        raise ValueError(f"expected a mapping with 'listen' and 'target', got {_show(item)}")
    listen = _server_description(listen)
    target_text = _text(target, "a target host:port")
    return listen, _address(target_text)


def _tcp_routes(value: Any) -> Tuple[TcpRoute, ...]:
    if isinstance(value, str):
        items: List[Any] = [] if not value.strip() else value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(
            f"expected 'LISTEN_DESC->host:port,...' or a list of {{listen, target}} mappings, got {_show(value)}")
    routes = []
    bad = []
    for index, item in enumerate(items, 1):
        try:
            routes.append(_tcp_route(item))
        except ValueError as e:
            bad.append(f"route {index}: {e}")
    if bad:
        raise ValueError("; ".join(bad))
    return tuple(routes)


# ---------------------------------------------------------------------------------------------------------------
# The option table.


@dataclass(frozen=True)
class Option:
    """
    One configuration option and how to read it from every source.

    C{tap.py} builds one C{usage.Options} parameter per entry, named L{flag} without its dashes and with a
    default of C{None}, so that "not given" stays distinguishable and lower-precedence sources can apply.

    @ivar name: the option's underscore name: the C{cli} mapping key and the YAML key.
    @ivar parse: turns a raw value (text, or any YAML value) into the parsed value; raises C{ValueError} with an
        operator-facing message.
    @ivar default_text: the default in the text syntax, for help and documentation; C{"none"} when the
        default is that nothing is set.
    @ivar help: one line for C{--help}.
    @ivar metavar: placeholder for the value in help text.
    @ivar fields: the L{Config} fields this option sets. When there is more than one, C{parse} returns a tuple
        of values in the same order.
    @ivar in_file: whether the option may appear in the YAML config file.
    """

    name: str
    parse: Callable[[Any], Any]
    default_text: str
    help: str
    metavar: str = "VALUE"
    fields: Tuple[str, ...] = ()
    in_file: bool = True

    @property
    def flag(self) -> str:
        """
        The command-line flag, e.g. C{--detect-timeout}.
        """
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """
        The environment variable, e.g. C{LINKPROXY_DETECT_TIMEOUT}.
        """
        return ENV_PREFIX + self.name.upper()

    @property
    def default(self) -> Any:
        """
        The parsed default: the value L{Config} has when no source sets this option.
        """
        defaults = Config()
        values = tuple(getattr(defaults, f) for f in self.config_fields)
        return values[0] if len(values) == 1 else values

    @property
    def config_fields(self) -> Tuple[str, ...]:
        """
        The L{Config} fields this option sets.
        """
        return self.fields or (self.name,)


OPTIONS: Tuple[Option, ...] = (
    Option("outbound", _server_description, Config.outbound,
           "Outbound listener (the app sends its outgoing traffic here).", "DESC"),
    Option("inbound", _server_description, Config.inbound,
           "Inbound listener (other proxies and clients connect here).", "DESC"),
    Option("admin", _server_description, Config.admin,
           "Admin server: /live /ready /metrics /env.json /dashboard ...", "DESC"),
    Option("app", _client_description, Config.app,
           "Where inbound traffic is forwarded: the local application.", "DESC"),
    Option("tcp_routes", _tcp_routes, "none",
           "Fixed outbound TCP routes: comma-separated LISTEN_DESC->host:port.", "ROUTES"),
    Option("detect_timeout", _duration(allow_zero=False), "10s",
           "Protocol detection timeout; undetected connections are proxied as opaque TCP.", "DURATION"),
    Option("connect_timeout", _duration(allow_zero=False), "1s",
           "Timeout for connecting to an endpoint.", "DURATION"),
    Option("response_timeout", _duration(allow_zero=False), "10s",
           "Timeout from sending a request to receiving the response head.", "DURATION"),
    Option("shutdown_grace_period", _duration(allow_zero=True), "30s",
           "How long connections may drain on shutdown.", "DURATION"),
    Option("opaque_ports", _opaque_ports, "25,587,3306,4444,5432,6379,9300,11211",
           "Target ports never sniffed (proxied as opaque TCP): ports and ranges, comma-separated.", "PORTS"),
    Option("log_level", _log_level, "info",
           "Log level: debug, info, warn, error or critical.", "LEVEL"),
    Option("log_format", _choice(LOG_FORMATS), Config.log_format,
           "Log format: plain (one readable line per event) or json (one object per line).", "FORMAT"),
    Option("access_log", _choice(ACCESS_LOG_FORMATS), Config.access_log,
           "Access log: off, apache or json.", "FORMAT"),
    Option("access_log_file", _path, "none",
           "File the access log is appended to (when unset: standard error).", "PATH"),
    Option("discovery", _discovery, Config.discovery,
           "Service discovery: dns, file:PATH, static:NAME=ADDR,... or a plugin name.", "SPEC",
           fields=("discovery", "static_endpoints")),
    Option("balancer", _plugin_name, Config.balancer,
           "Load balancer: p2c-ewma, round-robin, least-request, random or a plugin name.", "NAME"),
    Option("identity_dir", _path, "none",
           "Identity directory (ca.pem, and cert.pem + key.pem or an issuer). Needs --identity-name.", "DIR"),
    Option("identity_name", _identity_name, "none",
           "This proxy's identity name. Needs --identity-dir.", "NAME"),
    Option("identity_service", _service_address, "none",
           "Identity service (host:port) that signs this proxy's certificate; --identity-dir then holds "
           "only ca.pem.", "HOST:PORT"),
    Option("identity_service_name", _identity_name, "none",
           "The identity the identity service must prove (when unset: "
           "identity.linkproxy.serviceaccount.identity.<trust domain of --identity-name>).", "NAME"),
    Option("identity_token_file", _path, "none",
           "Token proving this proxy's identity to the identity service, read afresh for each request.",
           "PATH"),
    Option("policy", _policy, Config.policy,
           "Inbound authorization: unauthenticated, authenticated, deny or allow:ID1,ID2,...", "MODE",
           fields=("policy", "policy_allow")),
    Option("h2_upgrade", _boolean, "off",
           "Carry HTTP/1 between proxies as HTTP/2 (on/off).", "BOOL"),
    Option("max_header_bytes", _integer(1024, 1048576), str(Config.max_header_bytes),
           "Largest request or response head accepted, in bytes (1024-1048576).", "BYTES"),
    Option("pool_idle_timeout", _duration(allow_zero=False), "3s",
           "How long an idle pooled connection is kept.", "DURATION"),
    Option("pool_max_idle", _integer(0, None), str(Config.pool_max_idle),
           "Idle pooled connections kept per endpoint.", "N"),
    Option("workers", _integer(1, 64), str(Config.workers),
           "Number of reactor processes (1-64).", "N"),
    Option("dst_override", _boolean, "off",
           "Honour the l5d-dst-override request header (on/off).", "BOOL"),
    Option("config", _path, "none",
           "YAML config file; command-line options and environment variables override it.", "FILE",
           fields=("config_file",), in_file=False),
)

_BY_NAME: Dict[str, Option] = {option.name: option for option in OPTIONS}
_ENV_NAMES: Dict[str, Option] = {option.env: option for option in OPTIONS}
_FILE_KEYS = sorted(o.name for o in OPTIONS if o.in_file)


# ---------------------------------------------------------------------------------------------------------------
# Sources.


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _file_label(key: str) -> str:
    return f"config file key {key!r}"


def _file_values(file: Any, problems: List[str]) -> Dict[str, Tuple[str, Any]]:
    """
    Map option names to C{(source label, raw value)} from a parsed YAML document, reporting unknown, duplicate
    and misshapen keys.
    """
    values: Dict[str, Tuple[str, Any]] = {}
    if file is None:
        return values
    if not isinstance(file, Mapping):
        problems.append(f"config file: expected a mapping of option names at the top level, got {_show(file)}")
        return values

    def put(name: str, label: str, value: Any) -> None:
        if name in values:
            problems.append(f"{label}: {name!r} is already set by {values[name][0]}; give it once")
        else:
            values[name] = (label, value)

    for key, value in file.items():
        if not isinstance(key, str):
            problems.append(f"config file key {_show(key)}: expected an option name such as 'detect_timeout'")
            continue
        label = _file_label(key)
        name = key.replace("-", "_")
        if name == "config":
            problems.append(f"{label}: a config file cannot name another config file; "
                            f"use --config or {CONFIG_ENV}")
        elif name not in _BY_NAME:
            problems.append(f"{label}: unknown option{_did_you_mean(name, _FILE_KEYS)}")
        elif name == "outbound" and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                sub_name = sub_key.replace("-", "_") if isinstance(sub_key, str) else sub_key
                sub_label = _file_label(f"{key}.{sub_key}")
                if sub_name == "listen":
                    put("outbound", sub_label, sub_value)
                elif sub_name == "tcp_routes":
                    put("tcp_routes", sub_label, sub_value)
                else:
                    problems.append(f"{sub_label}: unknown key (expected 'listen' and 'tcp_routes')")
        else:
            put(name, label, value)
    return values


def _env_values(env: Mapping[str, str], problems: List[str]) -> Dict[str, Tuple[str, Any]]:
    """
    Map option names to C{(variable name, value)} from the environment, reporting unknown C{LINKPROXY_*}
    variables: a misspelt variable would otherwise be silently ignored.
    """
    values: Dict[str, Tuple[str, Any]] = {}
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX):
            continue
        option = _ENV_NAMES.get(variable)
        if option is None:
            problems.append(f"{variable}: unknown environment variable{_did_you_mean(variable, sorted(_ENV_NAMES))}")
            continue
        values[option.name] = (variable, env[variable])
    return values


def parse_config(cli: Mapping[str, Optional[str]], env: Mapping[str, str], file: Optional[Mapping]) -> Config:
    """
    Combine every source into one L{Config}. For each option the command line wins over the environment,
    which wins over the config file, which wins over the default. Only the winning value of an option is
    checked, so a higher-precedence source can override a bad value below it.

    @param cli: option names (underscore spelling) to values; C{None} means the option was not given. Keys
        that are not options are ignored: C{usage.Options} has already rejected unknown flags.
    @param env: the process environment. Only C{LINKPROXY_*} variables are read.
    @param file: the parsed YAML config file (see L{read_config_file}), or C{None} when there is none.

    @raise ConfigError: listing every problem found, when there is at least one.
    """
    problems: List[str] = []
    file_values = _file_values(file, problems)
    env_values = _env_values(env, problems)

    settings: Dict[str, Any] = {}
    labels: Dict[str, str] = {}
    for option in OPTIONS:
        if cli.get(option.name) is not None:
            label, raw = option.flag, cli[option.name]
        elif option.name in env_values:
            label, raw = env_values[option.name]
        elif option.name in file_values:
            label, raw = file_values[option.name]
        else:
            continue
        try:
            parsed = option.parse(raw)
        except ValueError as e:
            problems.append(f"{label}: {e}")
            continue
        labels[option.name] = label
        if len(option.config_fields) == 1:
            parsed = (parsed,)
        settings.update(zip(option.config_fields, parsed))

    has_dir = settings.get("identity_dir") is not None
    has_name = settings.get("identity_name") is not None
    if has_name and not has_dir:
        problems.append(f"{labels['identity_name']}: an identity name needs an identity directory too "
                        "(--identity-dir); set both or neither")
    elif has_dir and not has_name:
        problems.append(f"{labels['identity_dir']}: an identity directory needs an identity name too "
                        "(--identity-name); set both or neither")

    _check_identity_service(settings, labels, problems)

    if problems:
        raise ConfigError(problems)
    return Config(**settings)


_SERVICE_INFIX = ".serviceaccount.identity."


def _check_identity_service(settings: Dict[str, Any], labels: Dict[str, str], problems: List[str]) -> None:
    """
    The identity-service options go together: the service needs a name and directory (for the anchors) and
    a token; its name and token mean nothing without it. Fills in the default service name.
    """
    service = settings.get("identity_service")
    if service is None:
        for name in ("identity_service_name", "identity_token_file"):
            if settings.get(name) is not None:
                problems.append(f"{labels[name]}: only used with an identity service (--identity-service)")
        return
    label = labels["identity_service"]
    name = settings.get("identity_name")
    if settings.get("identity_dir") is None or name is None:
        problems.append(f"{label}: an identity service needs --identity-name and --identity-dir "
                        "(which holds ca.pem, the trust anchors)")
    if settings.get("identity_token_file") is None:
        problems.append(f"{label}: an identity service needs a token to prove the identity "
                        "(--identity-token-file)")
    if settings.get("identity_service_name") is None and name is not None:
        _, sep, trust_domain = name.partition(_SERVICE_INFIX)
        if sep and trust_domain:
            settings["identity_service_name"] = f"identity.linkproxy{_SERVICE_INFIX}{trust_domain}"
        else:
            problems.append(f"{label}: cannot derive the service's identity from {name!r}, which has no "
                            "trust domain; give --identity-service-name")


def read_config_file(path: str) -> Mapping[str, Any]:
    """
    Read and parse a YAML config file. An empty file is an empty mapping.

    @raise ConfigError: if the file is missing or unreadable, is not valid YAML, or its top level is not a
        mapping.
    """
    import yaml
    label = f"config file {path!r}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{label}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{label}: cannot read it: {e.strerror or e}"]) from None
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{label}: invalid YAML{where}: {reason}"]) from None
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError([f"{label}: expected a mapping of option names at the top level, "
                           f"got {_show(document)}"])
    return document


def load_config(cli: Mapping[str, Optional[str]], env: Mapping[str, str]) -> Config:
    """
    Read the config file named by C{--config} or C{LINKPROXY_CONFIG}, if any, and L{parse_config} everything.
    A file that cannot be read is reported together with the problems in the other sources.

    @raise ConfigError: listing every problem found.
    """
    path = cli.get("config")
    if path is None:
        path = env.get(CONFIG_ENV)
    problems: List[str] = []
    file: Optional[Mapping] = None
    if path is not None and str(path).strip():
        try:
            file = read_config_file(str(path).strip())
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        config = parse_config(cli, env, file)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return config
