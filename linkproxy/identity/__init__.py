"""linkproxy.identity."""
