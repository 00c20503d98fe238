"""Errors msd reports to its users."""


class UserError(Exception):
    """A problem with the user's input (a file, an option, a setting the models reject): the
    command line reports it as one line, without a traceback."""
