"""amo-broker: an OAuth token broker for amoCRM and Kommo."""

__version__ = "0.1.0"
