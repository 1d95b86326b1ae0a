"""linkproxy.admin."""
