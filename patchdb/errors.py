"""The one exception type that the command line shows as a message rather than a traceback."""


class PatchdbError(Exception):
    """A problem with the user's input or files; the message names the problem and the fix."""
