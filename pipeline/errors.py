"""The one exception type the command line turns into a one-line error."""


class PipelineError(Exception):
    """A problem with the user's input or the run directory.

    The message is shown as is, on one line, so it must name the field, file
    or round at fault and say what is wrong with it.
    """


class ConfigError(PipelineError):
    """A config file or override that does not fit the typed config."""
