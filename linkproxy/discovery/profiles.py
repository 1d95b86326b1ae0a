"""
The live profiles of a proxy process: what the request path asks for each request, kept current by the
discovery backend that reads them (the endpoints file's C{profiles:} section; see L{FileDiscovery}).

    profiles = runtime.profiles
    profile = profiles.get(authority)           # None for a target without a profile
    if profile is not None:
        route = profile.route_for(method, request_path(target))
        splitter = profiles.splitter(authority)  # None without a split
        budget = profiles.budget(authority)      # one per target, kept across edits of other fields

A request asks for its authority as the client spelled it (C{Web.Test:80}). The spellings seen are
remembered, with the answer, so the common case is one dict lookup; a miss is remembered too, since most
targets have no profile. The memory is bounded, and forgotten on every edit.

The retry budget of a target survives an edit that leaves its C{retry_budget} unchanged, so editing a route
does not hand every client a fresh reserve of retries.
"""

from typing import Dict, List, Optional

from linkproxy.core.profile import BudgetSpec, Profile
from linkproxy.core.retry_budget import RetryBudget
from linkproxy.core.split import Splitter

__all__ = ["Profiles", "MAX_SPELLINGS", "MAX_BUDGETS"]

#: Authority spellings remembered; past it the memory starts over (hostile authorities cannot grow it).
MAX_SPELLINGS = 10000
#: Budgets held for targets without a profile (whose routes never retry, so this is only a bound).
MAX_BUDGETS = 10000

_UNKNOWN = object()
_DEFAULT_BUDGET = BudgetSpec()


class Profiles:
    """
    The current profiles, by target, with the per-target state the request path keeps alongside them.

    Not thread-safe: it lives on the reactor thread, and L{replace} is called from there too.
    """

    def __init__(self, profiles: Optional[Dict[str, Profile]] = None, *, clock=None,
                 max_spellings: int = MAX_SPELLINGS):
        """
        @param profiles: C{{canonical target: Profile}}, as L{linkproxy.core.profile.parse_profiles} returns.
        @param clock: an C{IReactorTime} whose C{seconds()} new budgets start from; C{None} starts them at 0.
        @param max_spellings: authority spellings remembered for the fast path.
        """
        self._clock = clock
        self._max_spellings = max(1, int(max_spellings))
        self._profiles: Dict[str, Profile] = {}
        # Spelling as asked -> Profile or None.
        self._spellings: Dict[str, Optional[Profile]] = {}
        # Canonical target -> its budget.
        self._budgets: Dict[str, RetryBudget] = {}
        # Canonical target -> (the profile it was built for, its splitter).
        self._splitters: Dict[str, tuple] = {}
        #: how many times L{replace} has applied a set (0 until the first).
        self.generation = 0
        if profiles:
            self.replace(profiles)

    def __repr__(self):
        return f"<Profiles {sorted(self._profiles)}>"

    def __len__(self):
        return len(self._profiles)

    def targets(self) -> List[str]:
        """
        The canonical targets that have a profile, sorted.
        """
        return sorted(self._profiles)

    def get(self, target: str) -> Optional[Profile]:
        """
        The profile of C{target}, or C{None}.

        @param target: the request's authority, C{"host:port"}, in any spelling discovery accepts.
        """
        profile = self._spellings.get(target, _UNKNOWN)
        if profile is not _UNKNOWN:
            return profile
        return self._lookup(target)

    def _lookup(self, target) -> Optional[Profile]:
        if not self._profiles:
            # No profiles at all (no file, or another backend): nothing to remember.
            return None
        profile = self._profiles.get(target)
        if profile is None:
            from linkproxy.discovery import normalize_target

            try:
                profile = self._profiles.get(normalize_target(target))
            except (ValueError, TypeError):
                profile = None
        if len(self._spellings) >= self._max_spellings:
            self._spellings.clear()
        self._spellings[target] = profile
        return profile

    def replace(self, profiles: Dict[str, Profile]) -> None:
        """
        Apply a new set of profiles (a good edit of the file): every later L{get} sees it.

        Budgets of targets whose C{retry_budget} is unchanged are kept; the others start afresh on next use.

        @param profiles: C{{canonical target: Profile}}.
        """
        profiles = dict(profiles)
        self._profiles = profiles
        self._spellings = {}
        self._splitters = {}
        for target in list(self._budgets):
            profile = profiles.get(target)
            spec = profile.retry_budget if profile is not None else None
            if spec != self._budgets[target].spec:
                del self._budgets[target]
        self.generation += 1

    def budget(self, target: str) -> RetryBudget:
        """
        The retry budget of C{target}, made on first use from its profile's C{retry_budget} (the defaults for
        a target without a profile).

        @param target: as for L{get}.
        """
        profile = self.get(target)
        key = profile.target if profile is not None else target
        budget = self._budgets.get(key)
        if budget is None:
            if profile is None and len(self._budgets) >= MAX_BUDGETS:
                # Only targets without a profile can get here in numbers; drop the oldest of those.
                for old in self._budgets:
                    if old not in self._profiles:
                        del self._budgets[old]
                        break
            spec = profile.retry_budget if profile is not None else _DEFAULT_BUDGET
            now = self._clock.seconds() if self._clock is not None else 0.0
            budget = self._budgets[key] = RetryBudget(spec, now)
        return budget

    def splitter(self, target: str) -> Optional[Splitter]:
        """
        The L{Splitter} of C{target}'s split, or C{None} when it has no profile or no split.

        @param target: as for L{get}.
        """
        profile = self.get(target)
        if profile is None or not profile.split:
            return None
        entry = self._splitters.get(profile.target)
        if entry is None or entry[0] is not profile:
            entry = self._splitters[profile.target] = (profile, Splitter(profile.split))
        return entry[1]
