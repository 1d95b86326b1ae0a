"""
The split layer: the concrete target of one request, by the weights of its profile's C{split:}.
"""


class SplitLayer:
    """
    Picks a split leg per request, with a random generator it owns (seeded in tests).
    """

    def __init__(self, profiles, rng):
        self._profiles = profiles
        self._rng = rng

    def concrete(self, profile, authority):
        """
        @param profile: the logical target's L{linkproxy.core.profile.Profile}, or C{None}.
        @param authority: the logical target.
        @return: the target to balance over: a split leg's target, or C{authority} itself when there is no split.
        """
        if profile is None or not profile.split:
            return authority
        splitter = self._profiles.splitter(profile.target)
        if splitter is None:
            return authority
        return splitter.pick(self._rng)
