"""The errors fedkit raises on bad input. Each message says what is wrong, the value given, and what is allowed."""


class ConfigError(ValueError):
    """A setting, dataset name or partition parameter that cannot work."""


class UpdateError(ValueError):
    """A client result that does not fit the global model (keys, shapes, dtype) or is not finite."""


class RoundFailed(RuntimeError):
    """Too few valid client results arrived for a round, even after retries; the global model is unchanged."""


class Unreadable(RuntimeError):
    """The server was asked for a global model it holds only encrypted: only the clients can read it."""
