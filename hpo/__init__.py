"""hpo: Optuna-driven hyperparameter search for PyTorch CNNs."""

__version__ = "0.1.0"
