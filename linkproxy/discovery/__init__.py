"""linkproxy.discovery."""
