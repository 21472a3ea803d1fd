"""Errors a user can cause, mapped to the CLI's exit statuses."""


class T2IError(Exception):
    """A failure with a one-line cause the user can act on (exit status 1)."""


class ConfigError(T2IError):
    """A usage or config error: a bad flag, key, type or value (exit status 2)."""


def first_line(text: object, limit: int | None = None) -> str:
    """The first line of `text` (an error's message), at most `limit` characters: what
    a one-line failure quotes from a library's longer message."""
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line[:limit] if limit else line
