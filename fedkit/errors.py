"""The errors fedkit raises on bad input. Each message says what is wrong, the value given, and what is allowed."""


class ConfigError(ValueError):
    """A setting, dataset name or partition parameter that cannot work."""


class UpdateError(ValueError):
    """A client result that does not fit the global model (keys, shapes, dtype) or is not finite."""


class RoundFailed(RuntimeError):
    """Too few valid client results arrived for a round, even after retries; the global model is unchanged."""


class Unreadable(RuntimeError):
    """The server was asked for a global model it holds only encrypted: only the clients can read it."""


class MissingExtra(ConfigError):
    """A feature needs an optional package that is not installed; the message names the extra that holds it
    (``pip install 'fedkit[privacy]'``). ``extra`` and ``package`` say which."""

    def __init__(self, message: str, extra: str, package: str) -> None:
        super().__init__(message)
        self.extra, self.package = extra, package
