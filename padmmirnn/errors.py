"""Errors that mean "the user asked for something wrong": reported as one line."""


class PadmmError(Exception):
    """Base class of errors reported to the user as one clear line, exit code 2."""


class ConfigError(PadmmError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class DataError(PadmmError):
    """Missing or invalid dataset file (names the file and the problem)."""
