"""The errors that mean "your input is wrong": one base class, :class:`UserError`, that the CLI catches.

A bad config key, a model that cannot be found, an unknown task, a damaged expert or registry
entry, a run that cannot go on: each module defines its own error class (``ConfigError``,
``ModelLoadError``, ``UnknownTaskError``, ``RegistryError``, ...) as a subclass of
:class:`UserError`, keeping its built-in second base (``ValueError``, ``KeyError``,
``RuntimeError``) so that ``except ValueError`` callers still work.  The CLI prints a
:data:`USER_ERRORS` error in one line, without a traceback, and exits 2.

This module imports nothing (the old version imported eight modules to list the classes, so
importing ``TrainingError`` loaded the experts, registry, models and tasks); a test checks it.
"""


class UserError(Exception):
    """Base of every error caused by the user's input or setup; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key (also ``t2dist.config.ConfigError``)."""


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (a learner rank died, the cluster is too small, ...)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended a run; the message is the one line that says what was kept (the CLI prints it, exit 130)."""


USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)
