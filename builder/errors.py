"""The one exception type users see: its message names the file, key or missing piece."""


class KdumpError(Exception):
    """A failure the user can act on; the CLI prints it without a traceback and exits non-zero."""
