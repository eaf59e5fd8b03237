"""adaptloop: continuous, per-user LoRA adapter learning driven by Kafka events.

This package is the top floor: what composes the sides into commands a
person runs. The command line (`cli/`, one module per command group), the
local stack (`stack.py`), the demo (`demo.py`), the publish front end
(`publish.py`) and the command client (`commands.py`).

The floors below it, each importing only downward:
    api/                 the HTTP API
    streams/, trainer/   the two sides, side by side (neither imports the other)
    schemas/             the contracts between them (messages, datasets, manifests)
    core/                errors, settings, storage, Kafka plumbing
"""

__version__ = "0.1.0"
