"""The package's own failures: a run that could not produce a result it can vouch for.

Bad input (a wrong argument, a missing or malformed file) is a ``ValueError`` or ``FileNotFoundError``
(``repvgg`` exits with status 2). A [`RunFailed`][repvgg.errors.RunFailed] is a run that went wrong on valid input
(status 1).
"""

from __future__ import annotations

__all__ = ["RunFailed", "ConversionMismatch", "NonFiniteOutput", "OutOfMemory", "TrainingDiverged", "WriteFailed",
           "EXIT_OK", "EXIT_RUN_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]

#: Exit statuses of every ``repvgg`` subcommand: success; a [`RunFailed`][repvgg.errors.RunFailed]; bad input or usage;
#: interrupted with a resumable checkpoint.
EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class RunFailed(RuntimeError):
    """A run that could not produce a trustworthy result; nothing unverified was written."""


class ConversionMismatch(RunFailed):
    """A converted, exported or quantized model does not compute what its source does."""


class TrainingDiverged(RunFailed):
    """The loss or the validation metrics became NaN or infinite; the last good checkpoint is kept."""


class NonFiniteOutput(RunFailed):
    """A model gave NaN or infinite outputs for valid input: its predictions cannot be trusted (the model's fault,
    not the input's; a server answers it with a 500)."""


class WriteFailed(RunFailed):
    """A file could not be written (no space, a file-size limit, permissions); its previous version is intact."""


class PeerLost(RunFailed):
    """Another process of a distributed run stopped (killed, or its machine lost) and the collectives failed; the
    last finished epoch's checkpoint is kept."""


class OutOfMemory(RunFailed):
    """The machine (or the process's limits) could not give the memory a step needed; what was written before is
    intact."""
