"""Exit codes of the `flowcraft` command and the error that carries a one-line message."""
from __future__ import annotations

EXIT_OK = 0  # success; a run completed, or paused awaiting input
EXIT_FAILED = 1  # a run failed, was cancelled or stalled; lint found errors
EXIT_USAGE = 2  # bad usage or input, unknown run, unreachable service: nothing was changed
EXIT_TIMEOUT = 3  # `wait --timeout`: the run had not finished in time (it goes on)
EXIT_INTERRUPTED = 130  # Ctrl-C outside the commands that handle it
EXIT_BROKEN_PIPE = 141  # stdout's reader went away (`| head`): 128 + SIGPIPE, as a shell reports it


class CliError(Exception):
    """A problem with the command's input, reported as one line `flowcraft: error: <message>`."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) folded to one space."""
    return " ".join(str(text).split())
