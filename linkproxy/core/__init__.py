"""linkproxy.core."""
