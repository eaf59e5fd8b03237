"""The one root exception of adaptloop and its few subclasses.

Catch `AdaptloopError` at the edge (the CLI turns it into a one-line
message and exit code 2); raise the most specific subclass inside.
"""


class AdaptloopError(Exception):
    """Root of every error adaptloop raises on purpose."""


class ConfigError(AdaptloopError):
    """The settings file or an environment override is missing or invalid."""


class BrokerError(AdaptloopError):
    """The local Kafka broker could not be fetched, started, reached or stopped."""


class KafkaOperationError(AdaptloopError):
    """A Kafka admin, produce or consume operation failed."""


class InvalidMessage(AdaptloopError):
    """A message could not be decoded or validated; `reason` says why.

    The streams side sends such messages to the dead-letter topic with the
    reason; they never crash an agent.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StorageError(AdaptloopError):
    """An artifact could not be read or written, or failed its integrity check."""


class ModelError(AdaptloopError):
    """A base model or adapter could not be found, converted, loaded or trained."""


class RollbackError(AdaptloopError):
    """A rollback cannot be carried out (nothing earlier to go back to, no such version); nothing changed."""


class ReviewError(AdaptloopError):
    """A review cannot be decided (no such review, already decided, its version unusable); nothing changed."""


class TrainingInterrupted(AdaptloopError):
    """A training run was asked to stop (SIGTERM, a revoked partition); its checkpoint is saved and it resumes later."""


class VersionNotFound(StorageError):
    """The user has no such adapter version (never registered, or archived)."""


class TrainingSkipped(AdaptloopError):
    """A training request holds nothing new to learn; `reason` says why (`no examples`, `nothing new since v<N>`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
