"""callingbox-exporter: exact Prometheus metrics from the CallingBox calls API."""

__version__ = "0.1.0"
