"""The data stages and loading: sources -> shards (ingest), T5 embeddings (precache), streaming.

- :mod:`imagen.data.sources`  embedded set, image folder, webdataset records
- :mod:`imagen.data.ingest`   check and normalise records into deterministic shards
- :mod:`imagen.data.shards`   the tar writer ingest and precache share
- :mod:`imagen.data.precache` unpadded fp16 T5 token embeddings beside each sample
- :mod:`imagen.data.loader`   the streams: split by node and worker, shuffle, decode
- :mod:`imagen.data.datamodule` the LightningDataModule over them (train and val loaders)
- :mod:`imagen.data.batches`  uint8 / unpadded batches, finished (normalised, padded) on the device
- :mod:`imagen.data.holdout`  held-out captions and real images for evaluation
"""
