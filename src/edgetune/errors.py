"""User-facing errors.

An `EdgetuneError` is a problem with the user's input or environment (a missing file, an
unknown config key, a model that cannot be found). Its message names the problem and the
fix; the CLI prints it without a traceback and exits with status 2. Anything else that
escapes is a bug and keeps its traceback.
"""


class EdgetuneError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(EdgetuneError):
    """A config key or value is wrong."""


class DataError(EdgetuneError):
    """A dataset is missing, empty or malformed."""


class ModelNotFoundError(EdgetuneError):
    """A model spec resolved to nothing; the message lists what was tried."""


class TrainingDivergedError(EdgetuneError):
    """The loss became NaN/inf or exploded; the last good checkpoint is kept."""
