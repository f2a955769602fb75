"""One exception tree for the whole project.

Third-party exceptions are translated once, where they happen (``raise X(...) from exc``);
the gRPC layer maps these classes to status codes in one place.
"""


class PerceptionError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidInputError(PerceptionError):
    """The caller sent something unusable: a corrupt image, absurd options (INVALID_ARGUMENT)."""


class NotReadyError(PerceptionError):
    """The service cannot answer yet or any more: loading, warming up, draining (UNAVAILABLE)."""


class OverloadedError(PerceptionError):
    """Over capacity; the request was shed rather than queued without bound (RESOURCE_EXHAUSTED)."""


class AuthError(PerceptionError):
    """Missing or wrong credentials (UNAUTHENTICATED)."""


class ConfigError(PerceptionError):
    """A configuration value, file or flag is wrong."""


class ManifestError(PerceptionError):
    """A manifest is missing, malformed, or names files that do not match it."""


class ModelError(PerceptionError):
    """A model or engine file cannot be loaded or run."""


class DataError(PerceptionError):
    """A dataset, label file or recording is malformed; the message names file and record."""


class RefusedError(PerceptionError):
    """A requested change was refused and nothing changed, e.g. a model that failed its checks
    (FAILED_PRECONDITION); the message says why."""
