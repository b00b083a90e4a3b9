"""NeMo Imagen interoperability: its weights and configs in this project's modules.

``from imagen.nemo import load_nemo_denoiser``: a ``.nemo`` archive or a MegatronImagen
``.ckpt`` as the project's denoiser (``den(x, sigma, text_embed=..., text_mask=...,
lowres=None) -> D(x; sigma)``). :mod:`imagen.nemo.convert` renames NeMo UNet weights and reads
NeMo's model config; :mod:`imagen.nemo.load` reads the files (``imagen import-nemo``).
"""

from imagen.nemo.convert import NemoWeightsError, load_nemo_weights, model_config_from_nemo
from imagen.nemo.load import NemoDenoiser, NemoLoadError, load_nemo_denoiser, read_nemo_checkpoint

__all__ = [
    "NemoDenoiser",
    "NemoLoadError",
    "NemoWeightsError",
    "load_nemo_denoiser",
    "load_nemo_weights",
    "model_config_from_nemo",
    "read_nemo_checkpoint",
]
