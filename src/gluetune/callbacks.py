"""Trainer callbacks gluetune adds: TensorBoard in <output_dir>/logs, and a graceful stop."""

from __future__ import annotations

import logging
import signal

from transformers import TrainerCallback

logger = logging.getLogger("gluetune")


def tensorboard_callback(log_dir: str):
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = log_dir  # transformers v5 dropped `logging_dir`; the callback reopens here, too
    return callback


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current optimizer step, save a checkpoint, stop.

    Pre-empted GPU jobs get a SIGTERM before the kill; this turns it into a resumable checkpoint.
    A second signal stops at once (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> GracefulStop:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.uninstall()
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("%s received: saving a checkpoint after this step, then stopping (again to stop now)",
                       signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class SingleClassWarning(TrainerCallback):
    """Say so when an evaluation predicts one class for every example: its MCC of 0 means
    'no signal', not 'a poor model', and a bare 0 in a table hides that."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        for key, value in (metrics or {}).items():
            if key.endswith("predicted_classes") and value == 1:
                logger.warning("epoch %.2f: the model predicts a single class for every example of %s; "
                               "its MCC of 0 means no signal", state.epoch or 0, key.removesuffix("_predicted_classes"))
