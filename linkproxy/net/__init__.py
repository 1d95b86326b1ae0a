"""linkproxy.net."""
