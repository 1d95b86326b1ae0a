"""
Tests for L{linkproxy.config}.
"""

import json
import os
import tempfile
from dataclasses import dataclass, fields

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.config import (
    CONFIG_ENV,
    DEFAULT_OPAQUE_PORTS,
    OPTIONS,
    REDACTED,
    Config,
    ConfigError,
    load_config,
    parse_config,
    read_config_file,
    redact,
)


def problemsOf(testCase, cli=None, env=None, file=None):
    """
    Parse the given sources, which must fail, and return the list of problems.
    """
    error = testCase.assertRaises(ConfigError, parse_config, cli or {}, env or {}, file)
    return error.problems


class DefaultsTests(SynchronousTestCase):
    """
    With no sources at all, the configuration is the documented default.
    """

    def test_emptySources(self):
        """
        Empty CLI, environment and no file give L{Config}'s defaults, which match the design's contract.
        """
        config = parse_config({}, {}, None)
        self.assertEqual(config, Config())
        self.assertEqual(config.outbound, "tcp:4140:interface=127.0.0.1")
        self.assertEqual(config.inbound, "tcp:4143")
        self.assertEqual(config.admin, "tcp:4191:interface=127.0.0.1")
        self.assertEqual(config.app, "tcp:host=127.0.0.1:port=8080")
        self.assertEqual(config.tcp_routes, ())
        self.assertEqual(config.detect_timeout, 10.0)
        self.assertEqual(config.connect_timeout, 1.0)
        self.assertEqual(config.response_timeout, 10.0)
        self.assertEqual(config.shutdown_grace_period, 30.0)
        self.assertEqual(config.opaque_ports, {25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.discovery, "dns")
        self.assertEqual(config.static_endpoints, ())
        self.assertEqual(config.balancer, "p2c-ewma")
        self.assertIsNone(config.identity_dir)
        self.assertIsNone(config.identity_name)
        self.assertEqual((config.policy, config.policy_allow), ("unauthenticated", ()))
        self.assertFalse(config.h2_upgrade)
        self.assertEqual(config.max_header_bytes, 65536)
        self.assertEqual(config.pool_idle_timeout, 3.0)
        self.assertEqual(config.pool_max_idle, 256)
        self.assertEqual(config.workers, 1)
        self.assertFalse(config.dst_override)
        self.assertIsNone(config.config_file)
        self.assertEqual((config.log_format, config.access_log, config.access_log_file), ("plain", "off", None))

    def test_emptyFileAndNoneCli(self):
        """
        An empty file mapping and CLI entries of C{None} (options not given) also give the defaults.
        """
        cli = {option.name: None for option in OPTIONS}
        self.assertEqual(parse_config(cli, {"PATH": "/bin", "HOME": "/root"}, {}), Config())

    def test_defaultTextParsesToDefault(self):
        """
        Each option's documented C{default_text} parses to the default L{Config} holds, so help text and
        behaviour cannot drift apart.
        """
        for option in OPTIONS:
            if option.default_text == "none":
                self.assertIn(option.default, (None, ()), option.name)
                continue
            self.assertEqual(option.parse(option.default_text), option.default, option.name)

    def test_everyFieldHasOneOption(self):
        """
        Every L{Config} field is set by exactly one entry of the option table.
        """
        covered = [name for option in OPTIONS for name in option.config_fields]
        self.assertEqual(sorted(covered), sorted(f.name for f in fields(Config)))

    def test_optionNames(self):
        """
        Each option exposes its flag and environment variable spelled from its name, and help text.
        """
        byName = {option.name: option for option in OPTIONS}
        option = byName["detect_timeout"]
        self.assertEqual(option.flag, "--detect-timeout")
        self.assertEqual(option.env, "LINKPROXY_DETECT_TIMEOUT")
        self.assertEqual(option.default_text, "10s")
        for option in OPTIONS:
            self.assertTrue(option.help, option.name)

    def test_frozen(self):
        """
        L{Config} cannot be changed after it is built.
        """
        config = Config()
        self.assertRaises(Exception, setattr, config, "workers", 4)


class PrecedenceTests(SynchronousTestCase):
    """
    CLI over environment over file over default, per option.
    """

    def test_cliOverEnv(self):
        """
        A CLI value wins over the environment.
        """
        config = parse_config({"detect_timeout": "3"}, {"LINKPROXY_DETECT_TIMEOUT": "4"}, None)
        self.assertEqual(config.detect_timeout, 3.0)

    def test_envOverFile(self):
        """
        An environment value wins over the file.
        """
        config = parse_config({}, {"LINKPROXY_WORKERS": "4"}, {"workers": 2})
        self.assertEqual(config.workers, 4)

    def test_fileOverDefault(self):
        """
        A file value wins over the default.
        """
        config = parse_config({}, {}, {"log_level": "debug"})
        self.assertEqual(config.log_level, "debug")

    def test_cliOverFile(self):
        """
        A CLI value wins over the file when the environment is silent.
        """
        config = parse_config({"balancer": "random"}, {}, {"balancer": "round-robin"})
        self.assertEqual(config.balancer, "random")

    def test_cliOverDefault(self):
        """
        A CLI value wins over the default.
        """
        self.assertEqual(parse_config({"inbound": "tcp:5000"}, {}, None).inbound, "tcp:5000")

    def test_envOverDefault(self):
        """
        An environment value wins over the default.
        """
        self.assertTrue(parse_config({}, {"LINKPROXY_H2_UPGRADE": "on"}, None).h2_upgrade)

    def test_noneMeansNotGiven(self):
        """
        A CLI entry of C{None} does not hide the environment or the file.
        """
        config = parse_config({"workers": None, "log_level": None},
                              {"LINKPROXY_WORKERS": "3"}, {"log_level": "warn"})
        self.assertEqual((config.workers, config.log_level), (3, "warn"))

    def test_perOption(self):
        """
        Precedence is decided per option: each option comes from its own highest source.
        """
        config = parse_config({"workers": "2"}, {"LINKPROXY_LOG_LEVEL": "error"}, {"balancer": "random"})
        self.assertEqual((config.workers, config.log_level, config.balancer), (2, "error", "random"))

    def test_dashedFileKey(self):
        """
        YAML keys may be spelt with dashes as well as underscores.
        """
        config = parse_config({}, {}, {"detect-timeout": "2s", "max-header-bytes": 2048})
        self.assertEqual((config.detect_timeout, config.max_header_bytes), (2.0, 2048))

    def test_shadowedBadValueIgnored(self):
        """
        Only the winning value of an option is checked, so a CLI flag can override a broken value below it.
        """
        config = parse_config({"workers": "2"}, {"LINKPROXY_WORKERS": "lots"}, {"workers": -1})
        self.assertEqual(config.workers, 2)

    def test_configPath(self):
        """
        The config file path is recorded from C{--config}, or else C{LINKPROXY_CONFIG}, and not read.
        """
        self.assertEqual(parse_config({"config": "/a.yaml"}, {CONFIG_ENV: "/b.yaml"}, None).config_file, "/a.yaml")
        self.assertEqual(parse_config({}, {CONFIG_ENV: "/b.yaml"}, None).config_file, "/b.yaml")


class ErrorReportingTests(SynchronousTestCase):
    """
    Every problem is collected into one L{ConfigError}, each naming its source.
    """

    def test_allProblemsAtOnce(self):
        """
        C{--outbound nonsense:foo --detect-timeout -3} reports both problems in one error.
        """
        problems = problemsOf(self, cli={"outbound": "nonsense:foo", "detect_timeout": "-3"})
        self.assertEqual(len(problems), 2)
        self.assertEqual(
            problems[0], "--outbound: invalid listen address 'nonsense:foo': Unknown endpoint type: 'nonsense'")
        self.assertTrue(problems[1].startswith("--detect-timeout: expected a duration > 0"), problems[1])
        self.assertIn("'-3'", problems[1])

    def test_messageListsEveryProblem(self):
        """
        C{str(ConfigError)} is one message with every problem on its own line.
        """
        error = self.assertRaises(ConfigError, parse_config,
                                  {"outbound": "nonsense:foo"}, {"LINKPROXY_WORKERS": "0"}, {"log_level": "loud"})
        lines = str(error).splitlines()
        self.assertEqual(lines[0], "invalid configuration (3 problems):")
        self.assertEqual(len(lines), 4)
        self.assertTrue(lines[1].strip().startswith("- --outbound:"))
        self.assertTrue(any("LINKPROXY_WORKERS: expected an integer from 1 to 64, got '0'" in line
                            for line in lines))
        self.assertTrue(any("config file key 'log_level': expected one of debug" in line and "'loud'" in line
                            for line in lines))

    def test_sourceNamedInEachForm(self):
        """
        The same bad value is attributed to the flag, the variable or the file key it came from.
        """
        self.assertTrue(problemsOf(self, cli={"detect_timeout": "x"})[0].startswith("--detect-timeout: "))
        self.assertTrue(problemsOf(self, env={"LINKPROXY_DETECT_TIMEOUT": "x"})[0].startswith(
            "LINKPROXY_DETECT_TIMEOUT: "))
        self.assertTrue(problemsOf(self, file={"detect_timeout": "x"})[0].startswith(
            "config file key 'detect_timeout': "))
        self.assertTrue(problemsOf(self, file={"detect-timeout": "x"})[0].startswith(
            "config file key 'detect-timeout': "))

    def test_unknownFileKey(self):
        """
        An unknown YAML key is a problem, with a suggestion when it looks like a typo.
        """
        problems = problemsOf(self, file={"detect_timout": 3, "frobnicate": 1})
        self.assertEqual(problems, [
            "config file key 'detect_timout': unknown option (did you mean 'detect_timeout'?)",
            "config file key 'frobnicate': unknown option",
        ])

    def test_nonStringFileKey(self):
        """
        A YAML key that is not a string is a problem.
        """
        problems = problemsOf(self, file={1: "x"})
        self.assertEqual(len(problems), 1)
        self.assertIn("config file key 1", problems[0])

    def test_unknownEnvVariable(self):
        """
        An unknown C{LINKPROXY_*} variable is a problem; other variables are not read at all.
        """
        problems = problemsOf(self, env={"LINKPROXY_WORKER": "2", "PATH": "/bin", "linkproxy_lower": "x"})
        self.assertEqual(problems, [
            "LINKPROXY_WORKER: unknown environment variable (did you mean 'LINKPROXY_WORKERS'?)"])

    def test_configEnvAllowed(self):
        """
        C{LINKPROXY_CONFIG} names the file and is not an unknown variable.
        """
        self.assertEqual(parse_config({}, {CONFIG_ENV: "/etc/linkproxy.yaml"}, None).config_file,
                         "/etc/linkproxy.yaml")

    def test_configKeyInFile(self):
        """
        A config file cannot name another config file.
        """
        problems = problemsOf(self, file={"config": "/other.yaml"})
        self.assertEqual(len(problems), 1)
        self.assertIn("cannot name another config file", problems[0])

    def test_duplicateFileKey(self):
        """
        Giving one option twice in the file, in both spellings, is a problem rather than a silent choice.
        """
        problems = problemsOf(self, file={"detect_timeout": 1, "detect-timeout": 2})
        self.assertEqual(len(problems), 1)
        self.assertIn("already set by config file key 'detect_timeout'", problems[0])

    def test_fileNotMapping(self):
        """
        A file document that is not a mapping is a problem.
        """
        problems = problemsOf(self, file=["workers", 2])
        self.assertEqual(problems, ["config file: expected a mapping of option names at the top level, got a list"])

    def test_identityNameWithoutDir(self):
        """
        An identity name without an identity directory is a problem.
        """
        problems = problemsOf(self, cli={"identity_name": "web.default.serviceaccount.identity.linkproxy.local"})
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("--identity-name: "))
        self.assertIn("set both or neither", problems[0])

    def test_identityDirWithoutName(self):
        """
        An identity directory without an identity name is a problem.
        """
        problems = problemsOf(self, env={"LINKPROXY_IDENTITY_DIR": "/var/run/linkproxy/identity"})
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("LINKPROXY_IDENTITY_DIR: "))

    def test_identityBoth(self):
        """
        Identity is on when both directory and name are given, from any mix of sources.
        """
        config = parse_config({"identity_dir": "/id"}, {},
                              {"identity_name": "web.default.serviceaccount.identity.linkproxy.local"})
        self.assertEqual(config.identity_dir, "/id")
        self.assertEqual(config.identity_name, "web.default.serviceaccount.identity.linkproxy.local")

    def test_identityNullInFile(self):
        """
        C{null} for the identity options in YAML means identity is off.
        """
        config = parse_config({}, {}, {"identity_dir": None, "identity_name": None})
        self.assertIsNone(config.identity_dir)


# Bad values for every option, each with a fragment of the expected message.
BAD_VALUES = {
    "outbound": [("nonsense:foo", "Unknown endpoint type: 'nonsense'"), ("tcp:abc", "invalid listen address"),
                 ("tcp:99999", "outside 0-65535"), ("tcp:4140:bogus=1", "invalid listen address"), ("", "''")],
    "inbound": [("tcp:-1", "outside 0-65535"), ("udp:53", "invalid listen address")],
    "admin": [("nonsense:foo", "Unknown endpoint type")],
    "app": [("tcp:host=x", "invalid client address"), ("tcp:host=x:port=0", "outside 1-65535"),
            ("tcp:host=x:port=y", "invalid client address"), ("nonsense:foo", "Unknown endpoint type")],
    "tcp_routes": [("tcp:15432", "expected LISTEN_DESC->host:port"),
                   ("nonsense:1->db:5432", "Unknown endpoint type"),
                   ("tcp:15432->db", "missing port"), ("tcp:15432->db:99999", "invalid port"),
                   ("tcp:1->a:1,,tcp:2->b:2", "route 2")],
    "detect_timeout": [("0", "> 0"), ("-3", "'-3'"), ("10x", "'10x'"), ("", "''"), ("inf", "'inf'"),
                       ("nan", "'nan'"), ("1e3", "'1e3'"), ("9" * 400, "...")],
    "connect_timeout": [("0ms", "> 0"), ("soon", "'soon'")],
    "response_timeout": [("-1s", "'-1s'")],
    "shutdown_grace_period": [("-1", ">= 0"), ("forever", "'forever'")],
    "opaque_ports": [("0", "'0'"), ("65536", "'65536'"), ("25,x", "'x'"), ("9-1", "'9-1'"), ("25,,587", "''"),
                     ("-5", "'-5'")],
    "log_level": [("loud", "'loud'"), ("", "expected one of debug, info, warn, error, critical")],
    "log_format": [("text", "expected one of plain, json, got 'text'"), ("", "''")],
    "access_log": [("common", "expected one of off, apache, json, got 'common'"), ("on", "'on'")],
    "access_log_file": [("", "expected a path")],
    "discovery": [("file:", "expected a path after 'file:'"), ("static:", "at least one entry"),
                  ("static:a:80", "NAME=ADDR"), ("static:a:80=b", "missing port"),
                  ("static:a=b:1", "missing port"), ("Bad Name", "'Bad Name'"), ("9dns", "'9dns'")],
    "balancer": [("P2C", "'P2C'"), ("", "''"), ("round robin", "'round robin'")],
    "identity_dir": [("", "expected a path")],
    "identity_service": [("nohost", "host:port"), ("h:99999", "99999")],
    "identity_service_name": [("Identity.x", "DNS-like")],
    "identity_token_file": [("", "expected a path")],
    "identity_name": [("Web.default", "DNS-like"), ("a..b", "DNS-like"), ("-a.b", "DNS-like"),
                      ("a" * 64, "DNS-like"), (".".join(["a" * 60] * 5), "DNS-like"), ("", "DNS-like")],
    "policy": [("open", "'open'"), ("allow:", "at least one identity"), ("allow:a,B", "DNS-like"),
               ("", "''")],
    "h2_upgrade": [("maybe", "'maybe'"), ("2", "'2'")],
    "max_header_bytes": [("1023", "from 1024 to 1048576"), ("1048577", "'1048577'"), ("64k", "'64k'"),
                         ("1.5", "'1.5'")],
    "pool_idle_timeout": [("0", "> 0")],
    "pool_max_idle": [("-1", ">= 0"), ("x", "'x'")],
    "workers": [("0", "from 1 to 64"), ("65", "'65'"), ("", "''"), ("٣", "from 1 to 64")],
    "dst_override": [("enabled", "'enabled'")],
    "config": [("", "expected a path")],
}


class BadValueTests(SynchronousTestCase):
    """
    Every option rejects bad values, naming the source and what was given.
    """

    def test_everyOptionCovered(self):
        """
        The bad-value table has an entry for every option.
        """
        self.assertEqual(sorted(BAD_VALUES), sorted(option.name for option in OPTIONS))

    def test_badValues(self):
        """
        Each bad value, given on the command line or in the environment, is exactly one problem mentioning
        the source and the expected fragment.
        """
        for option in OPTIONS:
            for value, fragment in BAD_VALUES[option.name]:
                for source, label in [("cli", option.flag), ("env", option.env)]:
                    if source == "cli":
                        problems = problemsOf(self, cli={option.name: value})
                    else:
                        problems = problemsOf(self, env={option.env: value})
                    self.assertEqual(len(problems), 1, (option.name, value, problems))
                    self.assertTrue(problems[0].startswith(label + ": "), problems[0])
                    self.assertIn(fragment, problems[0], (option.name, value))

    def test_badValuesInFile(self):
        """
        The same bad values are rejected from the config file, attributed to the file key.
        """
        for option in OPTIONS:
            if not option.in_file:
                continue
            for value, fragment in BAD_VALUES[option.name]:
                problems = problemsOf(self, file={option.name: value})
                self.assertEqual(len(problems), 1, (option.name, value, problems))
                self.assertTrue(problems[0].startswith(f"config file key '{option.name}': "), problems[0])
                self.assertIn(fragment, problems[0])

    def test_badYamlTypes(self):
        """
        YAML values of the wrong type are problems, not crashes.
        """
        cases = {
            "outbound": 4140, "app": None, "detect_timeout": True, "workers": 2.5, "h2_upgrade": 2,
            "opaque_ports": {"a": 1}, "log_level": 3, "policy": ["deny"], "tcp_routes": 5,
            "max_header_bytes": "2048.0", "discovery": None, "balancer": None, "pool_max_idle": False,
            "detect-timeout": None, "shutdown_grace_period": float("inf"),
        }
        problems = problemsOf(self, file=cases)
        self.assertEqual(len(problems), len(cases), problems)


class ValueSyntaxTests(SynchronousTestCase):
    """
    The accepted syntaxes of individual value types.
    """

    def test_durations(self):
        """
        Durations are seconds, with optional C{ms}, C{s}, C{m} or C{h} suffixes, or YAML numbers.
        """
        for text, seconds in [("10", 10.0), ("10s", 10.0), ("500ms", 0.5), ("1.5", 1.5), ("1.5s", 1.5),
                              (".25", 0.25), ("2m", 120.0), ("1h", 3600.0), (" 3S ", 3.0), ("100 ms", 0.1)]:
            self.assertEqual(parse_config({"connect_timeout": text}, {}, None).connect_timeout, seconds, text)
        self.assertEqual(parse_config({}, {}, {"connect_timeout": 2}).connect_timeout, 2.0)
        self.assertEqual(parse_config({}, {}, {"connect_timeout": 0.2}).connect_timeout, 0.2)

    def test_logAndAccessLogFormats(self):
        """
        C{--log-format}, C{--access-log} and C{--access-log-file} are read from every source, case-insensitively;
        a YAML C{access_log: off} (which YAML reads as false) means C{off}.
        """
        config = parse_config({"log_format": "JSON"}, {"LINKPROXY_ACCESS_LOG": "apache",
                                                       "LINKPROXY_ACCESS_LOG_FILE": "/var/log/access.log"}, None)
        self.assertEqual((config.log_format, config.access_log, config.access_log_file),
                         ("json", "apache", "/var/log/access.log"))
        import yaml
        file = yaml.safe_load("log_format: json\naccess_log: off\naccess_log_file: /tmp/a.log\n")
        config = parse_config({}, {}, file)
        self.assertEqual((config.log_format, config.access_log, config.access_log_file),
                         ("json", "off", "/tmp/a.log"))
        self.assertEqual(parse_config({}, {}, {"access_log": "json"}).access_log, "json")

    def test_zeroGracePeriod(self):
        """
        A shutdown grace period of zero is allowed: stop immediately.
        """
        self.assertEqual(parse_config({"shutdown_grace_period": "0"}, {}, None).shutdown_grace_period, 0.0)

    def test_booleans(self):
        """
        Booleans accept on/off, true/false, yes/no, 1/0 in any case, and YAML booleans.
        """
        for text in ["on", "true", "yes", "1", "ON", "True"]:
            self.assertTrue(parse_config({"dst_override": text}, {}, None).dst_override, text)
        for text in ["off", "false", "no", "0", "OFF"]:
            self.assertFalse(parse_config({"dst_override": text}, {"LINKPROXY_DST_OVERRIDE": "on"},
                                          None).dst_override, text)
        self.assertTrue(parse_config({}, {}, {"h2_upgrade": True}).h2_upgrade)

    def test_opaquePorts(self):
        """
        Opaque ports are comma-separated ports and ranges, or a YAML list; empty text means none.
        """
        self.assertEqual(parse_config({"opaque_ports": "25, 8000-8003,25"}, {}, None).opaque_ports,
                         {25, 8000, 8001, 8002, 8003})
        self.assertEqual(parse_config({}, {}, {"opaque_ports": [3306, "9000-9001"]}).opaque_ports,
                         {3306, 9000, 9001})
        self.assertEqual(parse_config({}, {}, {"opaque_ports": 5432}).opaque_ports, {5432})
        self.assertEqual(parse_config({"opaque_ports": ""}, {}, None).opaque_ports, frozenset())
        self.assertEqual(parse_config({"opaque_ports": "1-65535"}, {}, None).opaque_ports,
                         frozenset(range(1, 65536)))
        self.assertEqual(Config().opaque_ports, DEFAULT_OPAQUE_PORTS)

    def test_opaquePortsAllBadReported(self):
        """
        Every bad port in the list is named in the one problem for the option.
        """
        problems = problemsOf(self, cli={"opaque_ports": "0,25,x,70000"})
        self.assertEqual(len(problems), 1)
        for fragment in ["'0'", "'x'", "'70000'"]:
            self.assertIn(fragment, problems[0])

    def test_logLevel(self):
        """
        Log levels are case-insensitive and stored in lower case.
        """
        self.assertEqual(parse_config({"log_level": "DEBUG"}, {}, None).log_level, "debug")
        for level in ["debug", "info", "warn", "error", "critical"]:
            self.assertEqual(parse_config({"log_level": level}, {}, None).log_level, level)

    def test_discovery(self):
        """
        Discovery accepts C{dns}, C{file:PATH}, C{static:...} and bare plugin names.
        """
        self.assertEqual(parse_config({"discovery": "dns"}, {}, None).discovery, "dns")
        config = parse_config({"discovery": "file:/etc/linkproxy/endpoints.yaml"}, {}, None)
        self.assertEqual((config.discovery, config.static_endpoints), ("file:/etc/linkproxy/endpoints.yaml", ()))
        self.assertEqual(parse_config({"discovery": "kubernetes"}, {}, None).discovery, "kubernetes")
        self.assertEqual(parse_config({"discovery": "my_disco-2"}, {}, None).discovery, "my_disco-2")

    def test_staticDiscovery(self):
        """
        C{static:NAME=ADDR,...} is parsed into C{static_endpoints}, keeping repeated names as several
        endpoints.
        """
        config = parse_config(
            {"discovery": "static:web.default:80=127.0.0.1:8081, web.default:80=127.0.0.1:8082,db:5432=[::1]:5432"},
            {}, None)
        self.assertEqual(config.static_endpoints, (
            ("web.default:80", ("127.0.0.1", 8081)),
            ("web.default:80", ("127.0.0.1", 8082)),
            ("db:5432", ("::1", 5432)),
        ))

    def test_policy(self):
        """
        Policy modes, and C{allow:} with a list of identities into C{policy_allow}.
        """
        for mode in ["unauthenticated", "authenticated", "deny"]:
            config = parse_config({"policy": mode}, {}, None)
            self.assertEqual((config.policy, config.policy_allow), (mode, ()))
        config = parse_config({"policy": "allow:a.ns.serviceaccount.identity.x, b.ns.serviceaccount.identity.x"},
                              {}, None)
        self.assertEqual(config.policy, "allow")
        self.assertEqual(config.policy_allow, ("a.ns.serviceaccount.identity.x", "b.ns.serviceaccount.identity.x"))

    def test_integers(self):
        """
        Integer options accept their bounds, from text or YAML.
        """
        self.assertEqual(parse_config({"workers": "64"}, {}, None).workers, 64)
        self.assertEqual(parse_config({"max_header_bytes": "1024"}, {}, None).max_header_bytes, 1024)
        self.assertEqual(parse_config({}, {}, {"max_header_bytes": 1048576}).max_header_bytes, 1048576)
        self.assertEqual(parse_config({"pool_max_idle": "0"}, {}, None).pool_max_idle, 0)

    def test_endpointDescriptions(self):
        """
        Valid endpoint descriptions are stored as given (whitespace trimmed), including port 0 and UNIX
        sockets for listeners.
        """
        config = parse_config({"outbound": " tcp:0:interface=127.0.0.1 ", "inbound": "unix:/tmp/in.sock",
                               "admin": "tcp6:4191:interface=\\:\\:1", "app": "unix:path=/tmp/app.sock"}, {}, None)
        self.assertEqual(config.outbound, "tcp:0:interface=127.0.0.1")
        self.assertEqual(config.inbound, "unix:/tmp/in.sock")
        self.assertEqual(config.admin, "tcp6:4191:interface=\\:\\:1")
        self.assertEqual(config.app, "unix:path=/tmp/app.sock")


class TcpRoutesTests(SynchronousTestCase):
    """
    TCP routes in their text form (CLI, environment) and their YAML forms.
    """

    expected = (
        ("tcp:15432:interface=127.0.0.1", ("db.default", 5432)),
        ("tcp:16379", ("redis.default", 6379)),
    )

    def test_cli(self):
        """
        The CLI text form is comma-separated C{LISTEN_DESC->host:port}.
        """
        config = parse_config(
            {"tcp_routes": "tcp:15432:interface=127.0.0.1->db.default:5432, tcp:16379->redis.default:6379"},
            {}, None)
        self.assertEqual(config.tcp_routes, self.expected)

    def test_env(self):
        """
        The environment uses the same text form.
        """
        config = parse_config(
            {}, {"LINKPROXY_TCP_ROUTES": "tcp:15432:interface=127.0.0.1->db.default:5432,tcp:16379->redis.default:6379"},
            None)
        self.assertEqual(config.tcp_routes, self.expected)

    def test_yamlUnderOutbound(self):
        """
        In YAML, C{outbound} may be a mapping with C{listen} and C{tcp_routes}.
        """
        config = parse_config({}, {}, {"outbound": {
            "listen": "tcp:5140",
            "tcp_routes": [{"listen": "tcp:15432:interface=127.0.0.1", "target": "db.default:5432"},
                           {"listen": "tcp:16379", "target": "redis.default:6379"}],
        }})
        self.assertEqual(config.outbound, "tcp:5140")
        self.assertEqual(config.tcp_routes, self.expected)

    def test_yamlOutboundWithoutListen(self):
        """
        An C{outbound} mapping without C{listen} keeps the default listener; C{tcp-routes} may be dashed.
        """
        config = parse_config({}, {}, {"outbound": {"tcp-routes": ["tcp:16379->redis.default:6379"]}})
        self.assertEqual(config.outbound, Config.outbound)
        self.assertEqual(config.tcp_routes, self.expected[1:])

    def test_yamlTopLevel(self):
        """
        C{tcp_routes} is also accepted at the top level of the file.
        """
        config = parse_config({}, {}, {"tcp_routes": [
            {"listen": "tcp:15432:interface=127.0.0.1", "target": "db.default:5432"},
            "tcp:16379->redis.default:6379"]})
        self.assertEqual(config.tcp_routes, self.expected)

    def test_cliOverridesYaml(self):
        """
        CLI routes replace the file's routes rather than adding to them.
        """
        config = parse_config({"tcp_routes": "tcp:16379->redis.default:6379"}, {},
                              {"outbound": {"tcp_routes": [{"listen": "tcp:1", "target": "x:1"}]}})
        self.assertEqual(config.tcp_routes, self.expected[1:])

    def test_ipv6Target(self):
        """
        Targets may be bracketed IPv6 literals.
        """
        config = parse_config({"tcp_routes": "tcp:15432->[fd00::1]:5432"}, {}, None)
        self.assertEqual(config.tcp_routes, (("tcp:15432", ("fd00::1", 5432)),))

    def test_bothYamlPlaces(self):
        """
        Routes given both at the top level and under C{outbound} are a problem, not a silent merge.
        """
        problems = problemsOf(self, file={"tcp_routes": [], "outbound": {"tcp_routes": []}})
        self.assertEqual(len(problems), 1)
        self.assertIn("already set by config file key 'tcp_routes'", problems[0])

    def test_badYamlRoutes(self):
        """
        Bad YAML routes are reported by position, all in one problem for the option.
        """
        problems = problemsOf(self, file={"outbound": {"tcp_routes": [
            {"listen": "tcp:1", "target": "x:1"},
            {"listen": "tcp:2"},
            {"listen": "tcp:3", "target": "x:3", "port": 3},
            {"listen": "nonsense:foo", "target": "x:4"},
            {"listen": "tcp:5", "target": 5},
            7,
        ]}})
        self.assertEqual(len(problems), 1)
        problem = problems[0]
        self.assertTrue(problem.startswith("config file key 'outbound.tcp_routes': route 2: "), problem)
        for fragment in ["route 3: unknown keys 'port'", "route 4: invalid listen address 'nonsense:foo'",
                         "route 5: expected a target host:port, got 5", "route 6: expected a mapping"]:
            self.assertIn(fragment, problem)
        self.assertNotIn("route 1", problem)

    def test_unknownOutboundKey(self):
        """
        Unknown keys inside the C{outbound} mapping are problems.
        """
        problems = problemsOf(self, file={"outbound": {"lisen": "tcp:1"}})
        self.assertEqual(problems, ["config file key 'outbound.lisen': unknown key (expected 'listen' and 'tcp_routes')"])

    def test_empty(self):
        """
        Empty text and an empty list both mean no routes.
        """
        self.assertEqual(parse_config({"tcp_routes": ""}, {}, None).tcp_routes, ())
        self.assertEqual(parse_config({}, {}, {"tcp_routes": []}).tcp_routes, ())


class ReadConfigFileTests(SynchronousTestCase):
    """
    L{read_config_file} reads YAML and reports every way that can fail as a L{ConfigError}.
    """

    def write(self, content):
        """
        Write C{content} (bytes) to a temporary file and return its path.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(lambda: (os.path.exists(path) and os.remove(path), os.rmdir(directory)))
        path = os.path.join(directory, "linkproxy.yaml")
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_valid(self):
        """
        A mapping document is returned as parsed.
        """
        path = self.write(b"workers: 2\noutbound:\n  listen: tcp:5140\n")
        self.assertEqual(read_config_file(path), {"workers": 2, "outbound": {"listen": "tcp:5140"}})

    def test_empty(self):
        """
        An empty file is an empty configuration.
        """
        self.assertEqual(read_config_file(self.write(b"# nothing set\n")), {})

    def test_missing(self):
        """
        A missing file is reported by path.
        """
        path = os.path.join(tempfile.mkdtemp(), "absent.yaml")
        error = self.assertRaises(ConfigError, read_config_file, path)
        self.assertEqual(error.problems, [f"config file {path!r}: no such file"])

    def test_unreadable(self):
        """
        A path that cannot be read (here a directory) is reported with the reason.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        error = self.assertRaises(ConfigError, read_config_file, directory)
        self.assertEqual(len(error.problems), 1)
        self.assertTrue(error.problems[0].startswith(f"config file {directory!r}: cannot read it: "),
                        error.problems[0])

    def test_syntaxError(self):
        """
        A YAML syntax error is reported with its line and column.
        """
        error = self.assertRaises(ConfigError, read_config_file, self.write(b"workers: 2\nlog_level: [info\n"))
        self.assertEqual(len(error.problems), 1)
        self.assertIn("invalid YAML at line ", error.problems[0])

    def test_notUtf8(self):
        """
        Bytes that are not text are reported as invalid YAML rather than crashing.
        """
        error = self.assertRaises(ConfigError, read_config_file, self.write(b"workers: \xff\xfe\x00\x81\n"))
        self.assertIn("invalid YAML", error.problems[0])

    def test_notMapping(self):
        """
        A top level that is not a mapping is reported.
        """
        for content, shown in [(b"- workers\n- 2\n", "a list"), (b"just text\n", "'just text'")]:
            error = self.assertRaises(ConfigError, read_config_file, self.write(content))
            self.assertIn(f"expected a mapping of option names at the top level, got {shown}", error.problems[0])

    def test_loadConfig(self):
        """
        L{load_config} reads the file named by C{LINKPROXY_CONFIG} and records its path; CLI still wins.
        """
        path = self.write(b"workers: 2\nlog-level: debug\n")
        config = load_config({"workers": "3"}, {CONFIG_ENV: path})
        self.assertEqual((config.workers, config.log_level, config.config_file), (3, "debug", path))

    def test_loadConfigCombinesProblems(self):
        """
        L{load_config} reports a missing file together with the problems in the other sources.
        """
        path = os.path.join(tempfile.mkdtemp(), "absent.yaml")
        error = self.assertRaises(ConfigError, load_config, {"config": path, "workers": "0"}, {})
        self.assertEqual(len(error.problems), 2)
        self.assertIn("no such file", error.problems[0])
        self.assertTrue(error.problems[1].startswith("--workers: "))

    def test_loadConfigNoFile(self):
        """
        Without C{--config} or C{LINKPROXY_CONFIG}, L{load_config} reads nothing.
        """
        self.assertEqual(load_config({}, {}), Config())


class RedactionTests(SynchronousTestCase):
    """
    L{Config.redacted} shows the effective configuration without secrets.
    """

    def test_jsonSerialisable(self):
        """
        The redacted form is JSON-serialisable and shows every field, with paths visible.
        """
        config = parse_config(
            {"identity_dir": "/var/run/linkproxy/identity",
             "identity_name": "web.default.serviceaccount.identity.linkproxy.local",
             "tcp_routes": "tcp:15432->db:5432", "discovery": "static:web:80=127.0.0.1:8081",
             "policy": "allow:a.b"}, {}, None)
        data = json.loads(json.dumps(config.redacted()))
        self.assertEqual(sorted(data), sorted(f.name for f in fields(Config)))
        self.assertEqual(data["identity_dir"], "/var/run/linkproxy/identity")
        self.assertEqual(data["tcp_routes"], [{"listen": "tcp:15432", "target": "db:5432"}])
        self.assertEqual(data["static_endpoints"], [{"name": "web:80", "address": "127.0.0.1:8081"}])
        self.assertEqual(data["opaque_ports"], sorted(DEFAULT_OPAQUE_PORTS))
        self.assertEqual(data["policy_allow"], ["a.b"])

    def test_sensitiveFieldRedacted(self):
        """
        A field whose name contains key, token, secret or password is redacted by L{Config.redacted}.
        """
        @dataclass(frozen=True)
        class WithSecrets(Config):
            api_token: str = "t0ken"
            signing_key: str = "-----BEGIN PRIVATE KEY-----"
            unset_password: object = None

        data = WithSecrets().redacted()
        self.assertEqual(data["api_token"], REDACTED)
        self.assertEqual(data["signing_key"], REDACTED)
        self.assertIsNone(data["unset_password"])
        self.assertNotIn("t0ken", json.dumps(data))
        self.assertNotIn("PRIVATE KEY", json.dumps(data))

    def test_redactNested(self):
        """
        L{redact} works through nested mappings and lists, case-insensitively.
        """
        data = {"a": [{"Client_Secret": "s", "name": "n"}], "PASSWORD": "p", "keep": 1}
        self.assertEqual(redact(data), {"a": [{"Client_Secret": REDACTED, "name": "n"}],
                                        "PASSWORD": REDACTED, "keep": 1})


_yamlScalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
_yamlValues = st.recursive(
    _yamlScalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)
_optionNames = st.sampled_from([option.name for option in OPTIONS])


class PropertyTests(SynchronousTestCase):
    """
    Whatever the input, L{parse_config} returns a L{Config} or raises L{ConfigError}, never anything else.
    """

    def check(self, cli, env, file):
        """
        Parse, allowing only a L{Config} result or a L{ConfigError} with a printable message.
        """
        try:
            config = parse_config(cli, env, file)
        except ConfigError as e:
            self.assertTrue(e.problems)
            self.assertIsInstance(str(e), str)
        else:
            self.assertIsInstance(config, Config)
            json.dumps(config.redacted())

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(_optionNames, st.text(max_size=60) | st.none()),
           st.dictionaries(_optionNames, st.text(max_size=60)))
    def test_arbitraryText(self, cli, env):
        """
        Arbitrary text for every option, on the CLI and in the environment.
        """
        self.check(cli, {("LINKPROXY_" + name.upper()): value for name, value in env.items()}, None)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(_optionNames | st.text(max_size=20), _yamlValues))
    def test_arbitraryFile(self, file):
        """
        Arbitrary YAML-shaped values for every option key (and random keys) in the file.
        """
        self.check({}, {}, file)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from([option for option in OPTIONS]),
           st.text(alphabet=st.sampled_from(list("tcpunixsl:=-,>0123456789.[]abdhmo \\")), max_size=40))
    def test_nearMissText(self, option, text):
        """
        Text built from the characters these syntaxes use, which reaches deeper into each parser.
        """
        self.check({option.name: text}, {}, None)
