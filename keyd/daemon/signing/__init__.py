"""The API keyd exists for: routes, request checks, tokens, signatures, decisions."""
