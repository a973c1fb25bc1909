"""The REST proxy: path checks, the proxy, its statistics."""
