"""Errors a user can fix by changing a command line or starting something first.

`weightshare` prints them as one log line with the fix, never as a traceback (weightshare/cli.py).
"""


class UsageError(Exception):
    """A mistake in how a command was run; the message names the flag or value and what to do."""
