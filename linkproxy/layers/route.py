"""
The route layer: a logical target's profile, and the route of the profile a request matches.
"""

from linkproxy.core.profile import DEFAULT_ROUTE, request_path


class RouteLayer:
    """
    Finds the profile of the target a request names, and the first of its routes the request matches.

    @ivar profiles: the live L{linkproxy.discovery.profiles.Profiles}, or C{None} when nothing supplies any.
    """

    def __init__(self, profiles):
        self.profiles = profiles

    def classify(self, authority, method, target):
        """
        @param authority: the logical target, C{"host:port"}.
        @param method: the request method, as bytes.
        @param target: the request-target as received (origin- or absolute-form).
        @return: C{(profile, route)}: C{(None, DEFAULT_ROUTE)} for a target without a profile.
        """
        profiles = self.profiles
        profile = profiles.get(authority) if profiles is not None else None
        if profile is None:
            return None, DEFAULT_ROUTE
        return profile, profile.route_for(method, request_path(target))
