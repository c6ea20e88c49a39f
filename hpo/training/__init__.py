"""Training, which knows nothing of Optuna: datasets → uint8 tensors on the device once → batches → fit → epoch results.

- ``datasets``:     datasets by name from their first source (folder, archive, torchvision), resized, normalized
- ``imagefolder``:  image folders and archives counted, decoded once (shorter side, centre crop) and cached
- ``memory``:       the memory check: host and device estimate before decoding, the image_size that fits
- ``arrays``:       ``ArrayData``: images in memory (numpy, torch) as a dataset, checked
- ``splits``:       ``Dataset`` in memory; the validation part carved from training; the retraining split
- ``batches``:      THE batch pipeline on the device: shuffle, crop and flip (padded or resized), normalize, cutout, mixup
- ``models``:       model builders registered by name (``@register_model``); ``torchvision:<arch>`` too
- ``user_models``:  the user's own models: import path, entry point or registered name; tried once before a search
- ``backbones``:    torchvision classifiers, pretrained or not, with a new head (the ``hpo_head`` protocol)
- ``optimization``: the optimizer (parameter groups), learning-rate schedule and training loss a trial asks for;
  freezing a backbone
- ``config``:       ``TrainConfig`` (into the loop) and ``EpochResult`` (out of it, per epoch)
- ``fit``:          THE training loop ``fit``; ``evaluate``; epoch checkpoints
- ``device``:       the device a study asks for, checked here; its name; the autocast precision by capability
- ``recipe``:       what a trial, its replay and its retraining share: seed, model, config, score, best epoch

May import: ``hpo.errors``, ``hpo.studyfile``.
"""
