"""The ground floor every side stands on: errors, settings, storage and the Kafka plumbing.

    errors.py     one root exception (`AdaptloopError`) and its few subclasses
    settings.py   typed, frozen settings (one YAML file, environment overrides): every default and
                  every name derived from the settings live here, once
    storage.py    the artifact store (a local directory or an fsspec URL) and the one atomic write
    kafka/        the local broker, client configs, topics, blocking produce/read helpers, consumer lag

Nothing here imports from another adaptloop package.
"""
