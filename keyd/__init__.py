"""keyd: keeps a TalkJS secret key in Vault and in one daemon's memory; signs tokens over a Unix socket."""

__version__ = "0.1.0"
