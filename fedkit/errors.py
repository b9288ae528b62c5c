"""The errors fedkit raises on bad input. Each message says what is wrong, the value given, and what is allowed."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

# a setting named in a message: {field}, {Owner.field}, {field=} (with its value), {field=literal} (with that value)
SETTING = re.compile(r"\{(?:([A-Za-z]\w*)\.)?(?!value\})([a-z_]\w*)(?:(=)([^{}]*))?\}")
NO_VALUE: Any = object()  # no value given (a setting named without one)
# (owner, field, the value shown or NO_VALUE for none, whether that value is an example written in the message) -> how
# another audience (the CLI) says the setting; None: as the API says it
Namer = Callable[[str | None, str, Any, bool], "str | None"]


def owner_name(obj: Any) -> str | None:
    """The name of the object a setting belongs to: ``"FedAvg"`` for the class, an instance, or that name."""
    if obj is None or isinstance(obj, str):
        return obj
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


class Worded(Exception):
    """An error that names settings structurally, so that one error serves the API and the command line.

    ``obj`` is what holds the setting (a class, an instance, or its name), ``field`` the setting, ``value`` the
    value given (said as ``, got <value>`` unless the message places ``{value}``), ``hint`` what to do. The message
    names settings as ``{field}`` (``{Owner.field}`` for another object's), ``{field=}`` for the setting with its
    value, ``{field=text}`` with the value ``text``: ``str(e)`` says them in the API's words, `worded` in another's
    (the command line's flags, `fedkit.cli.say`), so each rule and message is written once.

    >>> e = ConfigError("{rounds} must be an integer >= 1", obj="FedAvg", field="rounds", value=0, hint="e.g. 10")
    >>> str(e)
    'FedAvg.rounds must be an integer >= 1, got 0; e.g. 10'
    >>> e.worded(lambda owner, field, value, example: "--" + field.replace("_", "-"))
    '--rounds must be an integer >= 1, got 0; e.g. 10'
    """

    def __init__(self, message: str, *, obj: Any = None, field: str | None = None, value: Any = NO_VALUE,
                 hint: str | None = None) -> None:
        self.template, self.obj, self.field, self.value, self.hint = message, obj, field, value, hint
        super().__init__(self.worded())

    @property
    def owner(self) -> str | None:
        return owner_name(self.obj)

    @property
    def settings(self) -> list[tuple[str | None, str]]:
        """Every (owner, field) the message names, its own field first."""
        named = [(m.group(1) or self.owner, m.group(2)) for m in SETTING.finditer(self.template + (self.hint or ""))]
        own = [(self.owner, self.field)] if self.field else []
        return list(dict.fromkeys(own + named))

    def worded(self, name: Namer | None = None, hint: bool = True) -> str:
        """The message (and the hint), each setting said by ``name`` (owner, field, value) where it has words for
        it, else as the API says it (``FedAvg.rounds``, ``min_clients=3``)."""
        def say(m: re.Match) -> str:
            owner, field, valued, text = m.group(1) or self.owner, m.group(2), m.group(3), m.group(4)
            value = NO_VALUE if not valued else text if text else self._value_of(field)
            words = name(owner, field, value, bool(text)) if name else None
            if words is not None:
                return words
            if valued:
                return f"{field}={value if text else _shown(value)}"
            return f"{owner}.{field}" if owner else field

        got = "" if self.value is NO_VALUE or "{value}" in self.template else f", got {self.value!r}"
        text = SETTING.sub(say, self.template).replace("{value}", repr(self.value)) + got
        return text + (f"; {self.worded_hint(name)}" if hint and self.hint else "")

    def worded_hint(self, name: Namer | None = None) -> str | None:
        """The hint alone, its settings said by ``name``."""
        return self.hint and Worded(self.hint, obj=self.obj).worded(name)

    def _value_of(self, field: str) -> Any:
        if field == self.field and self.value is not NO_VALUE:
            return self.value
        return getattr(self.obj, field, None)


def _shown(value: Any) -> str:
    """A value as the API's messages show it: a function by its name (a partial with its arguments), else its repr."""
    if isinstance(value, functools.partial):
        args = [repr(a) for a in value.args] + [f"{k}={v!r}" for k, v in value.keywords.items()]
        return f"{_shown(value.func)}({', '.join(args)})"
    name = getattr(value, "__name__", None) if callable(value) and not isinstance(value, type) else None
    return name if isinstance(name, str) else repr(value)


def refusal(name: str, problem: str, value: Any = NO_VALUE, hint: str | None = None) -> ConfigError:
    """A `ConfigError` about the setting ``name`` (``"DPSGD.delta"``, or ``"seed"`` for an argument): ``"<name>
    <problem>, got <value>"``, structured."""
    owner, _, field = name.rpartition(".")
    return ConfigError("{%s} %s" % (field, problem), obj=owner or None, field=field, value=value, hint=hint)


class ConfigError(Worded, ValueError):
    """A setting, dataset name or partition parameter that cannot work (its settings named as `Worded` says)."""


class ConfigWarning(UserWarning):
    """A setting that works, but not as one might expect; worded as a `ConfigError` is (``.error``)."""

    def __init__(self, message: str, **fields: Any) -> None:
        self.error = ConfigError(message, **fields)
        super().__init__(str(self.error))


class UpdateError(ValueError):
    """A client result that does not fit the global model (keys, shapes, dtype) or is not finite."""


class RoundFailed(Worded, RuntimeError):
    """Too few valid client results arrived for a round, even after retries; the global model is unchanged (the
    settings to change named as `Worded` says)."""


class Unreadable(RuntimeError):
    """The server was asked for a global model it holds only encrypted: only the clients can read it."""


class MissingExtra(ConfigError):
    """A feature needs an optional package that is not installed; the message names the extra that holds it
    (``pip install 'fedkit[privacy]'``). ``extra`` and ``package`` say which."""

    def __init__(self, message: str, extra: str, package: str) -> None:
        super().__init__(message)
        self.extra, self.package = extra, package
