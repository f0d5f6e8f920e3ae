"""The one exception type for bad input: the CLI prints it as a single line and exits with code 2."""


class RaydpoError(ValueError):
    """A problem with the user's input or settings, reported before (or instead of) heavy work."""


class TrainingFailed(RuntimeError):
    """Training started but did not finish (a worker failed beyond max_failures); the CLI exits with 1."""
