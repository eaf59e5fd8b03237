"""The trainer side: LoRA training per user, the adapter registry and the
training consumer.

Run the service with `adaptloop trainer`, or train offline with
`adaptloop train`; see `trainer/service.py` and `trainer/offline.py`.
"""
