"""The HTTP API (FastAPI): trigger, inspect and roll back users' adapters; `adaptloop api` serves it.

`app.py` builds the app from an `ApiConfig` (`config.py`); the routes are in
`routes/`, the bearer tokens in `auth.py`, the jobs read back from Kafka in
`jobs.py`.
"""
