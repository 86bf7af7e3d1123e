"""Exceptions raised by visualad."""


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, unsafe, or does not fit the architecture."""


class UntrainedHeadWarning(UserWarning):
    """Maps or scores come from a fresh (random, untrained) head: give a trained head."""
