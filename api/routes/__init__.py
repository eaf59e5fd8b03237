"""The API's routers: `adapters` (the adapter lifecycle, per user) and `ops` (health, metrics)."""
