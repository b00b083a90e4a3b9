"""The MLOps glue: MLflow runs and registry, the DVC pipeline's parent runs, `dvc repro` timing.

- :mod:`imagen.mlops.client`    tracking URI (at the project root, also in DVC's executors),
                                experiment, the tags every run carries (DVC experiment too)
- :mod:`imagen.mlops.parent`    one parent run per pipeline execution (make demo, dvc, Prefect)
                                and per DVC experiment
- :mod:`imagen.mlops.tracking`  one child run per stage (:func:`stage_run`)
- :mod:`imagen.mlops.registry`  registered stage models and the imagen-cascade pyfunc
- :mod:`imagen.mlops.promote`   challenger / champion: promotion on evidence, ``imagen registry``
- :mod:`imagen.mlops.pipeline`  ``imagen pipeline``: timed `dvc repro`, runs, UI
"""
