"""sockvisor: a socket-activation supervisor (service, accept and pool modes)."""

__version__ = "0.1.0"
