"""
Per-target profiles: the routes, retry budget and traffic split of a logical target, as the C{profiles:}
section of the endpoints file declares them (Linkerd's ServiceProfile, trimmed to what this proxy does).

    profiles:
      web.test:80:
        retry_budget: {ratio: 0.2, min_per_second: 10, ttl: 10s}
        routes:
          - name: api-read
            match: {method: GET, path_regex: "^/api/"}
            timeout: 2s
            retryable: true
        split:
          - {target: web-v1.test:80, weight: 90}
          - {target: web-v2.test:80, weight: 10}

L{parse_profiles} turns the parsed YAML of that section into frozen L{Profile}s, or raises L{ProfileError}
naming every problem at once. Nothing here does I/O.
"""

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Pattern, Tuple

__all__ = [
    "Route",
    "DEFAULT_ROUTE",
    "BudgetSpec",
    "SplitLeg",
    "Profile",
    "ProfileError",
    "parse_profiles",
    "request_path",
    "MAX_PROFILES",
    "MAX_ROUTES",
    "MAX_SPLIT_LEGS",
    "MAX_ROUTE_NAME",
    "MAX_PATH_REGEX",
]

#: Most profiles one file may declare (the endpoints file's own target bound).
MAX_PROFILES = 10000
#: Most routes one profile may list: each request walks them in order, and each is a metric label value.
MAX_ROUTES = 1000
#: Most legs one split may have.
MAX_SPLIT_LEGS = 100
#: Longest route name, in characters (it is a metric label value).
MAX_ROUTE_NAME = 200
#: Longest C{path_regex}, in characters.
MAX_PATH_REGEX = 4096
#: Largest split weight; weights are summed into one integer range per pick.
MAX_WEIGHT = 1_000_000
#: Problems listed in one error message before the rest are summarised.
_MAX_PROBLEMS = 20

_PROFILE_KEYS = ("retry_budget", "routes", "split")
_ROUTE_KEYS = ("name", "match", "timeout", "retryable")
_MATCH_KEYS = ("method", "path_regex")
_BUDGET_KEYS = ("ratio", "min_per_second", "ttl")
_LEG_KEYS = ("target", "weight")

# RFC 9110 token characters: what an HTTP method may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def request_path(target: bytes) -> bytes:
    """
    The path of a request target, as routes match it: without the query string or fragment, and for an
    absolute-form target (C{http://host:port/p?q}) without the scheme and authority.

    @param target: the request target (HTTP/1) or C{:path} (HTTP/2).
    @return: the path; C{b"/"} for an absolute-form target with none, and C{target} itself for C{*}.
    """
    end = target.find(b"?")
    if end >= 0:
        target = target[:end]
    end = target.find(b"#")
    if end >= 0:
        target = target[:end]
    if target[:1] == b"/":
        return target
    scheme = target.find(b"://")
    if scheme > 0:
        slash = target.find(b"/", scheme + 3)
        return target[slash:] if slash >= 0 else b"/"
    return target


@dataclass(frozen=True)
class Route:
    """
    One route of a profile: which requests it matches, and what the proxy does for them.

    @ivar name: the route's name, the C{rt_route} metric label.
    @ivar method: the method matched exactly (upper-case), or C{None} for any.
    @ivar path_regex: searched in the request path (no query string), or C{None} for any path.
    @ivar timeout: seconds for the whole request, retries included, or C{None} for no route timeout.
    @ivar retryable: whether failed attempts (5xx, gRPC UNAVAILABLE) are retried within the budget.
    """

    name: str
    method: Optional[bytes] = None
    path_regex: Optional[Pattern[bytes]] = None
    timeout: Optional[float] = None
    retryable: bool = False

    def matches(self, method: bytes, path: bytes) -> bool:
        """
        Whether a request is on this route.

        @param method: the request method, as sent (methods are case-sensitive, RFC 9110).
        @param path: the request path without the query string (see L{request_path}).
        """
        if self.method is not None and method != self.method:
            return False
        # search, not fullmatch: the contract's own example, "^/api/", is a prefix match. linkerd2-proxy
        # instead wraps a pattern in ^...$ when it lacks them; a profile ported from Linkerd adds them itself.
        return self.path_regex is None or self.path_regex.search(path) is not None


#: The route of every request no declared route matches.
DEFAULT_ROUTE = Route("default")


@dataclass(frozen=True)
class BudgetSpec:
    """
    A retry budget's parameters, Linkerd's (and tower's C{TpsBudget}) defaults.

    @ivar ratio: retries allowed per original request, on top of the reserve.
    @ivar min_per_second: retries allowed per second whatever the request rate (the reserve is this times
        C{ttl}).
    @ivar ttl: seconds a request (and a retry) counts for.
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0


@dataclass(frozen=True)
class SplitLeg:
    """
    One backend of a traffic split.

    @ivar target: the canonical C{"host:port"} requests on this leg go to.
    @ivar weight: its share, relative to the other legs' weights.
    """

    target: str
    weight: int


@dataclass(frozen=True)
class Profile:
    """
    Everything the profile of one logical target declares.

    @ivar target: the canonical C{"host:port"} it is for.
    @ivar routes: in order; the first that matches a request is its route.
    @ivar retry_budget: the budget retries on any route of this target draw from.
    @ivar split: the weighted backends requests go to instead of C{target}; empty for no split.
    """

    target: str
    routes: Tuple[Route, ...] = ()
    retry_budget: BudgetSpec = BudgetSpec()
    split: Tuple[SplitLeg, ...] = ()

    def route_for(self, method: bytes, path: bytes) -> Route:
        """
        The route of a request: the first that matches, else L{DEFAULT_ROUTE}.

        @param path: the request path without the query string (see L{request_path}).
        """
        if not self.routes:
            return DEFAULT_ROUTE
        # Route.matches, inlined: this runs for every request on a profiled target.
        for route in self.routes:
            wanted = route.method
            if wanted is not None and wanted != method:
                continue
            regex = route.path_regex
            if regex is None or regex.search(path) is not None:
                return route
        return DEFAULT_ROUTE


class ProfileError(ValueError):
    """
    The C{profiles:} section is unusable.

    @ivar problems: every problem found, one line each, each starting with where it is
        (C{profiles.web.test:80.routes[0].timeout: ...}).
    """

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        shown = self.problems[:_MAX_PROBLEMS]
        if len(self.problems) > _MAX_PROBLEMS:
            shown.append(f"... and {len(self.problems) - _MAX_PROBLEMS} more")
        super().__init__("; ".join(shown))


def parse_profiles(data: Any) -> Dict[str, Profile]:
    """
    Check and build the profiles of the C{profiles:} section.

    @param data: the section as YAML parsed it: a mapping of C{"host:port"} to a profile mapping, or C{None}
        (no profiles).
    @return: C{{canonical target: Profile}}.
    @raise ProfileError: listing every problem found.
    """
    # Discovery's own normalisation, so a profile keys on exactly what discovery and the router key on.
    from linkproxy.discovery import normalize_target

    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError([f"profiles: expected a mapping of \"host:port\" to a profile, got "
                            f"{type(data).__name__}"])
    if len(data) > MAX_PROFILES:
        raise ProfileError([f"profiles: {len(data)} profiles, over the limit of {MAX_PROFILES}"])
    problems: List[str] = []
    profiles: Dict[str, Profile] = {}
    seen = set()
    for raw_target, body in data.items():
        where = f"profiles.{raw_target}"
        try:
            target = normalize_target(str(raw_target))
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if target in seen:
            problems.append(f"{where}: listed twice (names are compared ignoring case)")
            continue
        seen.add(target)
        profile = _profile(target, body, where, problems)
        if profile is not None:
            profiles[target] = profile
    if problems:
        raise ProfileError(problems)
    return profiles


def _profile(target: str, body: Any, where: str, problems: List[str]) -> Optional[Profile]:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        problems.append(f"{where}: expected a mapping with some of {list(_PROFILE_KEYS)}, got "
                        f"{type(body).__name__}")
        return None
    before = len(problems)
    _unknown(body, _PROFILE_KEYS, where, problems)
    budget = _budget(body.get("retry_budget"), f"{where}.retry_budget", problems)
    routes = _routes(body.get("routes"), f"{where}.routes", problems)
    split = _split(body.get("split"), f"{where}.split", problems)
    if len(problems) > before:
        return None
    return Profile(target=target, routes=routes, retry_budget=budget, split=split)


def _unknown(mapping: dict, known: Tuple[str, ...], where: str, problems: List[str]) -> None:
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} (expected some of {list(known)})")


def _budget(value: Any, where: str, problems: List[str]) -> BudgetSpec:
    default = BudgetSpec()
    if value is None:
        return default
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping with some of {list(_BUDGET_KEYS)}, got "
                        f"{type(value).__name__}")
        return default
    _unknown(value, _BUDGET_KEYS, where, problems)
    ratio = _number(value.get("ratio", default.ratio), 0.0, 1000.0, f"{where}.ratio",
                    "a number from 0 to 1000", problems)
    minimum = _number(value.get("min_per_second", default.min_per_second), 0.0, 1e9,
                      f"{where}.min_per_second", "a number from 0 to 1e9", problems)
    ttl = default.ttl
    if "ttl" in value:
        parsed = _duration(value["ttl"], f"{where}.ttl", problems)
        if parsed is not None:
            # Linkerd's (and finagle's) bounds: shorter forgets too fast, longer remembers stale traffic.
            if not 1.0 <= parsed <= 60.0:
                problems.append(f"{where}.ttl: must be from 1s to 60s, got {_show(value['ttl'])}")
            else:
                ttl = parsed
    return BudgetSpec(ratio=ratio, min_per_second=minimum, ttl=ttl)


def _number(value: Any, low: float, high: float, where: str, expected: str, problems: List[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        problems.append(f"{where}: expected {expected}, got {_show(value)}")
        return low
    return float(value)


def _duration(value: Any, where: str, problems: List[str]) -> Optional[float]:
    expected = "a duration > 0 such as 2s, 500ms, 1.5 or 10"
    seconds = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.strip().lower())
        if match is not None:
            try:
                seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
            except OverflowError:
                seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        problems.append(f"{where}: expected {expected}, got {_show(value)}")
        return None
    return seconds


def _routes(value: Any, where: str, problems: List[str]) -> Tuple[Route, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of routes, got {type(value).__name__}")
        return ()
    if len(value) > MAX_ROUTES:
        problems.append(f"{where}: {len(value)} routes, over the limit of {MAX_ROUTES}")
        return ()
    routes = []
    names: Dict[str, int] = {}
    for index, entry in enumerate(value):
        route = _route(entry, f"{where}[{index}]", problems)
        if route is None:
            continue
        if route.name in names:
            problems.append(f"{where}[{index}].name: {route.name!r} is also the name of route "
                            f"[{names[route.name]}] (names are unique per target)")
            continue
        names[route.name] = index
        routes.append(route)
    return tuple(routes)


def _route(entry: Any, where: str, problems: List[str]) -> Optional[Route]:
    if not isinstance(entry, dict):
        problems.append(f"{where}: expected a mapping with 'name', got {type(entry).__name__}")
        return None
    before = len(problems)
    _unknown(entry, _ROUTE_KEYS, where, problems)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}.name: expected a non-empty name, got {_show(name)}")
    elif len(name) > MAX_ROUTE_NAME or any(not c.isprintable() for c in name):
        problems.append(f"{where}.name: must be printable and at most {MAX_ROUTE_NAME} characters")
    elif name.strip() == "default":
        # A declared "default" would merge its series with the unmatched requests' series.
        problems.append(f"{where}.name: 'default' is the name of the unmatched requests' route")
    method = path_regex = None
    match = entry.get("match")
    if match is not None:
        if not isinstance(match, dict):
            problems.append(f"{where}.match: expected a mapping with some of {list(_MATCH_KEYS)}, got "
                            f"{type(match).__name__}")
        else:
            _unknown(match, _MATCH_KEYS, f"{where}.match", problems)
            method = _method(match.get("method"), f"{where}.match.method", problems)
            path_regex = _regex(match.get("path_regex"), f"{where}.match.path_regex", problems)
    timeout = None
    if entry.get("timeout") is not None:
        timeout = _duration(entry["timeout"], f"{where}.timeout", problems)
    retryable = entry.get("retryable", False)
    if not isinstance(retryable, bool):
        problems.append(f"{where}.retryable: expected true or false, got {_show(retryable)}")
    if len(problems) > before:
        return None
    return Route(name=name.strip(), method=method, path_regex=path_regex, timeout=timeout, retryable=retryable)


def _method(value: Any, where: str, problems: List[str]) -> Optional[bytes]:
    if value is None:
        return None
    if not isinstance(value, str) or not _TOKEN.fullmatch(value) or len(value) > 64:
        problems.append(f"{where}: expected an HTTP method such as GET, got {_show(value)}")
        return None
    # Requests carry standard methods in upper case; a profile saying "get" means GET.
    return value.upper().encode("ascii")


def _regex(value: Any, where: str, problems: List[str]) -> Optional[Pattern[bytes]]:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: expected a regular expression as text, got {_show(value)}")
        return None
    if len(value) > MAX_PATH_REGEX:
        problems.append(f"{where}: {len(value)} characters, over the limit of {MAX_PATH_REGEX}")
        return None
    try:
        return re.compile(value.encode("utf-8"))
    except (re.error, OverflowError, RecursionError) as e:
        problems.append(f"{where}: not a valid regular expression: {e}")
        return None


def _split(value: Any, where: str, problems: List[str]) -> Tuple[SplitLeg, ...]:
    from linkproxy.discovery import normalize_target

    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of {{target, weight}}, got {type(value).__name__}")
        return ()
    if len(value) > MAX_SPLIT_LEGS:
        problems.append(f"{where}: {len(value)} legs, over the limit of {MAX_SPLIT_LEGS}")
        return ()
    before = len(problems)
    legs = []
    seen = set()
    for index, entry in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{at}: expected a mapping with 'target' and 'weight', got {type(entry).__name__}")
            continue
        _unknown(entry, _LEG_KEYS, at, problems)
        target = None
        raw = entry.get("target")
        if not isinstance(raw, str):
            problems.append(f"{at}.target: expected \"host:port\", got {_show(raw)}")
        else:
            try:
                target = normalize_target(raw)
            except ValueError as e:
                problems.append(f"{at}.target: {e}")
            else:
                if target in seen:
                    problems.append(f"{at}.target: {target} is listed twice")
                seen.add(target)
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
            problems.append(f"{at}.weight: expected a whole number from 0 to {MAX_WEIGHT}, got {_show(weight)}")
            weight = None
        if target is not None and weight is not None:
            legs.append(SplitLeg(target=target, weight=weight))
    if len(problems) == before and value and not any(leg.weight > 0 for leg in legs):
        problems.append(f"{where}: at least one leg needs a weight above 0")
    return tuple(legs)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
