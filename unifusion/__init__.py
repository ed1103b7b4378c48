"""UniFusion: a diffusion image generator conditioned only on a frozen vision-language model.

Plain torch + transformers; this package never imports ComfyUI, so it runs standalone
(CLI, training) and inside the ComfyUI node pack alike.
"""

__version__ = "0.1.0"
