"""Exceptions raised for bad input; messages say what to do."""


class ConceptAttentionError(ValueError):
    """Invalid input or state; the message names the argument, the value and the fix."""


class UnsupportedArchitectureError(ConceptAttentionError):
    """The pipeline's transformer is not one of the supported MM-DiT architectures."""


class WeightsNotFoundError(ConceptAttentionError, OSError):
    """Model weights could not be found (offline, or a wrong id or path)."""
