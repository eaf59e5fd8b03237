"""The streams side: a faust-streaming worker that validates interaction events,
curates training examples, counts gaps per user and emits training requests.

Run it with `adaptloop worker`; see `streams/app.py` for the topology and
`streams/worker.py` for the entry point.
"""
