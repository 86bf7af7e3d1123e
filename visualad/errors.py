"""Exceptions raised by visualad."""


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, unsafe, or does not fit the architecture."""
