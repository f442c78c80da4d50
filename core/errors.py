"""The exceptions the command line turns into a one-line error."""


class PipelineError(Exception):
    """A problem with the user's input or the run directory.

    The message is shown as is, on one line, so it must name the field, file
    or round at fault and say what is wrong with it.
    """


class ConfigError(PipelineError):
    """A config file or override that does not fit the typed config."""


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the command (SIGINT arrives as a plain KeyboardInterrupt).

    A KeyboardInterrupt, so that no `except Exception` in a stage mistakes the
    stop for a failure to handle, and so that Ray's blocking calls, which let a
    KeyboardInterrupt through, do not turn it into a SystemError.
    """

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class TrainingDiverged(PipelineError):
    """Training produced a non-finite loss, gradient or weight.

    A retry would only repeat it (same data, same seed, same settings), so a
    worker raising it stops the train stage at once instead of being restarted.
    """
