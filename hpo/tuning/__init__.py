"""Tuning with Optuna: the storage, the study, and the worker that asks, trains through ``hpo.training`` and tells.

- ``storage``:   storage URL → Optuna's RDB storage: checks, engine settings, passwords hidden
- ``study``:     study file → sampler, pruner and study (created, resumed, or loaded to read results)
- ``budget``:    THE budget rule: finished trials count, running and waiting ones hold a place
- ``objective``: params → model → fit → report every epoch → prune (``Objective``, one ``TrialRun`` per trial)
- ``worker``:    one worker's ask-and-tell loop until the budget is met; clean stops on signals
- ``heartbeat``: the running trial's heartbeat thread, and the reaper of trials whose worker died
- ``retry``:     re-queuing ended trials: failures use up retries, interruptions do not
- ``outage``:    storage calls that wait out an outage; start-up races absorbed
- ``notes``:     the notes optuna-dashboard shows on pruned trials
- ``records``:   what a trial stores beside params and curve (each user attr is a write), read back for reports

May import: ``hpo.errors``, ``hpo.studyfile``, ``hpo.training``.
"""
