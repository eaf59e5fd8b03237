"""The HTTP API for the adapter lifecycle (FastAPI). Not built yet: see issue #6."""
