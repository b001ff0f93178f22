"""The one exception type a user should see: the CLI prints it as a single line and exits non-zero."""


class VildError(Exception):
    """A problem with the user's input or environment, stated in one line naming the file and the problem."""


class DataError(VildError):
    """Bad input data: an annotation file, an image, a cache."""
