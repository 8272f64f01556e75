"""gluetune: fast, honest parameter-efficient fine-tuning on GLUE-style sentence classification.

The Python API is the one the command line uses:

    import gluetune

    config = gluetune.load_config("configs/glue_cola_minilm_cpu.yaml", ["training.num_train_epochs=1"])
    outcome = gluetune.train(config)                      # outcome.metrics is metrics.json
    classifier = gluetune.Classifier.from_folder(config.output_dir)
    classifier.predict(["The book was written by John."])  # [Prediction(label=..., probability=...)]

Names load on first use, so `import gluetune` is instant.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "load_config": "config.run",
    "RunConfig": "config.run",
    "train": "training.run",
    "TrainOutcome": "training.run",
    "Classifier": "results.prediction",
    "Prediction": "results.prediction",
    "export_folder": "results.export",
    "evaluate_folder": "results.evaluation",
    "write_report": "search.report",
    "UserError": "errors",
}
__all__ = [*_API, "__version__"]  # noqa: PLE0604 (the keys of _API are names)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'gluetune' has no attribute {name!r}")
