"""linkworker: turns a PostgreSQL queue of payment-link jobs into links at provider APIs."""

__version__ = "0.1.0"
