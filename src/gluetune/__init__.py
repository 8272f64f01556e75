"""gluetune: fast, honest parameter-efficient fine-tuning on GLUE-style sentence classification."""

__version__ = "0.1.0"
