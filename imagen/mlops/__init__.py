"""The MLOps glue: MLflow runs and registry, the DVC pipeline's parent runs, `dvc repro` timing.

- :mod:`imagen.mlops.client`    tracking URI, experiment, the tags every run carries
- :mod:`imagen.mlops.parent`    one parent run per pipeline execution (make demo, dvc, Prefect)
- :mod:`imagen.mlops.tracking`  one child run per stage (:func:`stage_run`)
- :mod:`imagen.mlops.registry`  registered stage models and the imagen-cascade pyfunc
- :mod:`imagen.mlops.pipeline`  ``imagen pipeline``: timed `dvc repro`, runs, UI
"""
