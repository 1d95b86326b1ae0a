"""
Tests that keep the library internals fenced: the installed h2, hpack, hyperframe and Twisted are the releases
that L{linkproxy.net.h2_private} and L{linkproxy.net.twisted_private} were audited against, C{setup.cfg} says the
same, and no linkproxy module reaches into another one's C{_private} names.
"""

import ast
import configparser
import os
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.net import h2_private, twisted_private
from tests.proc import ROOT

#: The modules that fence library internals, each with its C{AUDITED} ranges.
FENCES = (h2_private, twisted_private)

#: Uses of another module's private names that predate this test, per file: C{{path: {"module._name", ...}}}.
#: The other modules are to offer public names for these; remove each entry as its use goes, until this is empty.
#: A new use fails the test, and so does an entry whose use is gone.
KNOWN = {
    # Empty: orig_proto once drove h2's and http1's internals; it now uses their exchange interfaces
    # (linkproxy.net.exchange). Keep it empty.
}


def outside_audited(audited, module_name, installed=version):
    """
    The installed distributions outside their audited range, as failure messages.

    @param audited: a fence module's C{AUDITED}: C{{distribution: (lower, upper)}}.
    @param module_name: the fence module's name, for the message.
    @param installed: returns the installed version of a distribution (L{importlib.metadata.version}).
    @return: one message per distribution outside its range (or not installed); empty when all are in range.
    """
    problems = []
    for dist, bounds in sorted(audited.items()):
        spec = ",".join(bounds)
        try:
            found = installed(dist)
        except PackageNotFoundError:
            problems.append(f"{dist} is not installed, but {module_name} overrides its internals")
            continue
        if not SpecifierSet(spec).contains(found, prereleases=True):
            problems.append(
                f"{dist} {found} is outside the audited range {spec} of {module_name}: re-audit that module's "
                f"overrides, then widen AUDITED and setup.cfg")
    return problems


def install_requires():
    """
    C{setup.cfg}'s C{install_requires}, as C{{canonical name: SpecifierSet}}.
    """
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    requirements = {}
    for line in parser["options"]["install_requires"].splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        requirements[canonicalize_name(req.name)] = req.specifier
    return requirements


class AuditedVersionTests(SynchronousTestCase):
    """
    The installed libraries whose internals linkproxy relies on are the audited ones.
    """

    def test_h2_private(self):
        """
        h2, hpack and hyperframe are within L{linkproxy.net.h2_private.AUDITED}.
        """
        problems = outside_audited(h2_private.AUDITED, h2_private.__name__)
        if problems:
            self.fail("\n".join(problems))

    def test_twisted_private(self):
        """
        Twisted is within L{linkproxy.net.twisted_private.AUDITED}.
        """
        problems = outside_audited(twisted_private.AUDITED, twisted_private.__name__)
        if problems:
            self.fail("\n".join(problems))

    def test_message_names_the_module(self):
        """
        A version outside the range fails with a message naming the distribution, the range and the module to
        re-audit; one inside passes.
        """
        audited = {"twisted": (">=23.10", "<26.11")}
        self.assertEqual(outside_audited(audited, "linkproxy.net.twisted_private", lambda dist: "26.10.1"), [])
        self.assertEqual(
            outside_audited(audited, "linkproxy.net.twisted_private", lambda dist: "27.1.0"),
            ["twisted 27.1.0 is outside the audited range >=23.10,<26.11 of linkproxy.net.twisted_private: "
             "re-audit that module's overrides, then widen AUDITED and setup.cfg"])

    def test_setup_cfg_matches(self):
        """
        C{setup.cfg} bounds each audited distribution exactly to its C{AUDITED} range, so the two cannot drift.
        """
        requirements = install_requires()
        for fence in FENCES:
            for dist, bounds in fence.AUDITED.items():
                self.assertTrue(bounds[1].startswith("<"), f"{fence.__name__}: {dist} has no upper bound")
                name = canonicalize_name(dist)
                self.assertIn(name, requirements, f"setup.cfg does not require {dist} ({fence.__name__})")
                self.assertEqual(
                    requirements[name], SpecifierSet(",".join(bounds)),
                    f"setup.cfg bounds {dist} to {requirements[name]} but {fence.__name__} was audited for "
                    f"{','.join(bounds)}: change both together")


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel.pop()
    return ".".join(rel)


def _is_module(name):
    parts = name.split(".")
    base = os.path.join(ROOT, *parts)
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def private_uses(path):
    """
    The names private to another linkproxy module that the module in C{path} uses: imported with
    C{from linkproxy.x import _name}, or read as an attribute of a linkproxy module (C{linkproxy.x._name}, or
    C{m._name} where C{m} names one).

    @return: a set of C{"linkproxy.x._name"} strings.
    """
    own = _module_name(path)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = own if path.endswith("__init__.py") else own.rpartition(".")[0]
    modules = {}  # local name -> the linkproxy module it is bound to
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "linkproxy":
                    if alias.asname:
                        modules[alias.asname] = alias.name
                    else:
                        modules["linkproxy"] = "linkproxy"
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            if source.split(".")[0] != "linkproxy":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if _is_module(full):
                    modules[alias.asname or alias.name] = full
                if _private(alias.name) and source != own:
                    found.add(full)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            target = _dotted(node.value, modules)
            if target is not None and target != own and _is_module(target):
                found.add(f"{target}.{node.attr}")
    return found


def _dotted(node, modules):
    # The linkproxy module an expression such as `h2` or `linkproxy.net.h2` names, or None.
    if isinstance(node, ast.Name):
        return modules.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, modules)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def all_private_uses():
    """
    L{private_uses} of every module under C{linkproxy/}, as C{{path relative to the root: uses}}.
    """
    uses = {}
    for directory, _, files in os.walk(os.path.join(ROOT, "linkproxy")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found = private_uses(path)
                if found:
                    uses[os.path.relpath(path, ROOT).replace(os.sep, "/")] = found
    return uses


class PrivateNamesTests(SynchronousTestCase):
    """
    No linkproxy module uses another module's C{_private} names, but for the shrinking L{KNOWN} list.
    """

    def test_no_new_uses(self):
        """
        Every use of another module's private name is in L{KNOWN}.
        """
        new = []
        for path, found in sorted(all_private_uses().items()):
            for name in sorted(found - KNOWN.get(path, set())):
                new.append(f"{path} uses {name}: give that module a public name for it")
        if new:
            self.fail("\n".join(new))

    def test_known_still_used(self):
        """
        Every entry of L{KNOWN} is still a use, so the list only shrinks.
        """
        uses = all_private_uses()
        gone = [f"{path} no longer uses {name}: remove it from KNOWN in {__name__}"
                for path, names in sorted(KNOWN.items()) for name in sorted(names - uses.get(path, set()))]
        if gone:
            self.fail("\n".join(gone))

    def test_detects(self):
        """
        The check finds a private name imported from, or read off, another linkproxy module, and leaves alone a
        module's own private names and other packages' ones.
        """
        source = (
            "import linkproxy.net.h2\n"
            "from linkproxy.net import http1 as h1\n"
            "from linkproxy.net.splice import _hidden, set_nodelay\n"
            "from twisted.internet import _sslverify\n"
            "def f():\n"
            "    return linkproxy.net.h2._Half, h1._R_UPFULL, h1.Http1Pool, _own\n"
            "_own = 1\n"
        )
        path = os.path.join(self.mktemp() + ".py")
        with open(path, "w") as f:
            f.write(source)
        self.assertEqual(private_uses(path), {
            "linkproxy.net.splice._hidden", "linkproxy.net.h2._Half", "linkproxy.net.http1._R_UPFULL",
        })
