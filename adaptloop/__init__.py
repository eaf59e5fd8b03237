"""adaptloop: continuous, per-user LoRA adapter learning driven by Kafka events.

This package holds what every side shares: settings, errors, the Kafka
plumbing (local broker, topics, client configs) and the command line.
The sides themselves live in the sibling packages `schemas`, `streams`,
`trainer` and `api`.
"""

__version__ = "0.1.0"
