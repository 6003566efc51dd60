"""One exception family for problems the user can fix.

The CLI prints `str(err)` as a single line and exits non-zero, so every message
names the culprit (file, tensor, task or config key) and, where it helps, the fix.
Programming errors stay ordinary exceptions and keep their tracebacks.
"""


class MergeflowError(Exception):
    """A problem with the user's input, environment or storage."""


class ConfigError(MergeflowError):
    """The merge config is invalid."""


class CheckpointError(MergeflowError):
    """A checkpoint is missing, unreadable, corrupt or inconsistent with the others."""


class StorageError(MergeflowError):
    """Object storage refused or failed a request."""


class OutputError(MergeflowError):
    """The output location cannot be used as asked."""
