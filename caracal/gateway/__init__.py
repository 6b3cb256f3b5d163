"""caracal-gateway: the TLS reverse proxy in front of a Caracal deployment's tool servers."""

__version__ = "0.1.0"
