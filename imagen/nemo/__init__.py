"""NeMo Imagen interoperability: its weights and configs in this project's modules.

``imagen.nemo.convert`` renames NeMo UNet weights; ``load_nemo_denoiser`` (imagen.nemo.load)
turns a ``.nemo`` archive or a MegatronImagen ``.ckpt`` into the project's denoiser.
"""
