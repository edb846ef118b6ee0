"""Errors a user can act on: the CLI prints their message, without a traceback."""


class RecoError(Exception):
    """Base of reco's errors; the message says what is wrong and how to fix it."""


class ConfigError(RecoError, ValueError):
    """A configuration that cannot be run; the message names the key and the fix."""
