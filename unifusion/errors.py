"""Exceptions the library raises for problems a user can fix.

Every message names the file or input at fault and what to do about it; the ComfyUI
nodes show these messages as they are.
"""


class UniFusionError(Exception):
    """Base class: a problem with user input, files or settings (not a bug)."""


class CheckpointError(UniFusionError, ValueError):
    """A UniFusion checkpoint is missing, unreadable, damaged or of another model."""


class VLMMismatchError(UniFusionError, ValueError):
    """The loaded VLM is not the one the checkpoint was trained with."""


class InputError(UniFusionError, ValueError):
    """A prompt, image or setting passed to encoding or sampling is unusable."""
