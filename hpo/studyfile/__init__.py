"""The study file, torch-free and Optuna-free: TOML in, frozen typed specs out, every error naming file, table and key.

- ``spec``:     the study file's tables → ``StudySpec``; ``Overrides`` (hpo.run's flags that replace values);
                finding a study by name in ``studies/``
- ``space``:    THE declaration of every hyperparameter (``Hyperparameters``); ``[space]`` → distributions
- ``samplers``: the ``[sampler]`` and ``[pruner]`` tables, one dataclass per Optuna sampler and pruner
- ``names``:    the model and dataset names a study file may use, which the builders register against

May import: ``hpo.errors``.
"""
