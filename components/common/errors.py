"""Errors a user can cause, mapped to the CLI's exit statuses."""


class T2IError(Exception):
    """A failure with a one-line cause the user can act on (exit status 1)."""


class ConfigError(T2IError):
    """A usage or config error: a bad flag, key, type or value (exit status 2)."""
