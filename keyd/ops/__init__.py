"""Operator commands: the dev server, status, grants, vault setup. Never imported by keyd.daemon."""
