"""The one exception type for bad input: the CLI prints it as a single line and exits with code 2."""


class RaydpoError(ValueError):
    """A problem with the user's input or settings, reported before (or instead of) heavy work."""


class TrainingFailed(RuntimeError):
    """Training started but did not finish (a worker failed beyond max_failures); the CLI exits with 1."""


def run_command(prog: str, command) -> int:
    """Run an entry point's body: one line on stderr and exit code 2 for bad input, 1 for a failed run."""
    import sys

    try:
        command()
    except RaydpoError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    return 0
