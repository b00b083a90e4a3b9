"""Few-image fine-tuning with LoRA: ``imagen finetune --stage base64 --images DIR``.

A handful of captioned pictures (a folder in any layout ingest reads) teach a trained stage a
new concept through low-rank adapters (``peft``'s LoRA) on the attention and convolution layers
of its UNet; the stage's own weights stay frozen. Optionally (DreamBooth's prior preservation)
samples the model itself generates from other captions train beside them, so what it already
draws is kept. The result is written as a stage model file with the adapters merged into the
weights, which every loader reads (``imagen sample --models``, the cascade pyfunc), plus the
adapters alone; it is logged to MLflow and registered as a version of ``imagen-<stage>``.

- :mod:`imagen.lora.images`: the folder of pictures and captions, checked before any work;
- :mod:`imagen.lora.adapters`: which layers get adapters, adding, merging, what changed;
- :mod:`imagen.lora.tune`: the training loop, the prior samples, the before/after loss;
- :mod:`imagen.lora.command`: the ``imagen finetune`` command (outputs, MLflow, registry).
"""
