"""The one base for a user's mistakes: the CLI prints them as one line and exits 2; anything else is a bug."""


class UserError(Exception):
    """A mistake the user can fix: the message names the file, key, port or flag, what was expected and what was
    found."""
