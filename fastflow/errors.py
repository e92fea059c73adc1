"""Errors that carry a message meant for the user: what is wrong and how to fix it."""

import click


class FastFlowError(Exception):
    """Base class; the CLI prints the message and exits with status 2 (usage error)."""


class UsageFailure(click.ClickException):
    """A user error on the command line: printed as ``Error: ...`` with exit status 2."""

    exit_code = 2


class UnknownNameError(FastFlowError, KeyError):
    """A policy, backend or model name that no plugin registered."""

    def __init__(self, kind: str, name: str, known, plural: str | None = None):
        import difflib

        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        msg = f"unknown {kind} '{name}'.{hint} Known {plural or kind + 's'}: {', '.join(known) or '(none)'}."
        super().__init__(msg)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class OptionError(FastFlowError, ValueError):
    """An option value that a policy or backend does not accept."""


class MissingDependencyError(FastFlowError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class StateFileError(FastFlowError):
    """A policy state file that cannot be used; it is never overwritten."""


class NonFiniteError(FastFlowError, FloatingPointError):
    """A velocity or sample became NaN or Inf."""


class DuplicateNameError(FastFlowError):
    """Two plugins registered the same name."""


class ExportError(FastFlowError):
    """An export or engine build that failed; nothing was written."""


class ExportVerificationError(ExportError):
    """The exported graph or engine disagrees with PyTorch beyond the tolerance."""


class ArtifactError(FastFlowError):
    """A missing, truncated or corrupt export directory, graph, engine or metadata file."""


class StaleEngineError(ArtifactError):
    """A TensorRT engine built by another TensorRT version, for another GPU or from
    other weights. The message says how to rebuild it."""


class InputMismatchError(FastFlowError, ValueError):
    """An input whose name, shape or dtype the graph or engine does not accept."""


class DenoiserInputError(InputMismatchError):
    """A denoiser call that the exported graph/engine cannot take: another non-tensor
    argument, a tensor it was not exported with, or a wrong rank, shape or dtype."""
