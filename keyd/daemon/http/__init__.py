"""The socket layer: connections, the server, socket files. Knows callers, not routes."""
