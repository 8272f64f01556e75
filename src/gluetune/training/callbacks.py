"""Trainer callbacks gluetune adds: TensorBoard in <output_dir>/logs, a graceful stop, a divergence
check, a loss record that survives resumes, and a warning for single-class models.

Every decision that stops a run is taken the same on every process (distributed.any_process), at
the same step: the processes of a multi-process run never part ways inside a collective.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from ..errors import TrainingDiverged
from ..results import rundir
from . import distributed

logger = logging.getLogger("gluetune")


class RunTensorBoard(TensorBoardCallback):
    """TensorBoard in the run's logging_dir, kept open after training so the final metrics land in
    the same event file under their own tag (`final/<metric>`)."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.logging_dir = log_dir  # transformers v5 dropped `logging_dir` from TrainingArguments

    def on_train_end(self, args, state, control, **kwargs):
        if self.tb_writer:
            self.tb_writer.flush()

    def write_final(self, metrics: dict[str, float], step: int) -> None:
        if self.tb_writer is None:
            self._init_summary_writer(None)
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb_writer.add_scalar(f"final/{name}", value, step)
        self.tb_writer.close()
        self.tb_writer = None


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current optimizer step, save a checkpoint, stop.

    Pre-empted GPU jobs get a SIGTERM before the kill; this turns it into a resumable checkpoint.
    A second signal stops at once (KeyboardInterrupt). With several processes the stop happens at
    the first step end where any of them has the signal, on all of them.
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
        if distributed.any_process(self.received is not None):
            self.received = self.received or signal.SIGTERM  # another process got it
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer still closes the epoch it left: no evaluation of a part-epoch model (it could
        # become the "best"), no second save over the checkpoint the stop just wrote.
        if self.received is not None:
            control.should_evaluate = control.should_save = False
        return control


class LossWatch(TrainerCallback):
    """Stops a run whose loss became NaN or infinite, before anything is saved after it.

    Each micro-batch's loss is checked on the device (`note`, called by the trainer): a Python
    `if` on it would wait for the GPU at every micro-batch. The first bad step is read where the
    Trainer waits anyway (logging, evaluation, saving, the last step), so no checkpoint is written
    after a bad step and the last good one stays intact.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.first_bad_step = None  # a device tensor: -1, or the first step with a non-finite loss

    def note(self, loss, step: int) -> None:
        import torch

        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)

    def _check(self, args, state) -> None:
        import torch

        local = self.first_bad_step if self.first_bad_step is not None else torch.tensor(-1)
        if not distributed.any_process(local >= 0):
            return
        step = int(local.item()) if int(local.item()) >= 0 else state.global_step
        last = rundir.latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint, {last.name}, is intact" if last else "no checkpoint was saved yet"
        remedies = ["a lower training.learning_rate"]
        if not args.warmup_steps:
            remedies.append("warmup (training.warmup_ratio=0.1)")
        if args.bf16 or args.fp16:
            remedies.append("fp32 (training.bf16=false)")
        if not args.max_grad_norm:
            remedies.append("gradient clipping (training.max_grad_norm=1.0)")
        raise TrainingDiverged(
            f"training diverged: the loss is not finite at step {step} (epoch {state.epoch or 0:.2f}); "
            f"{kept}. Usual remedies: {', '.join(remedies)}"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if (control.should_log or control.should_save or control.should_evaluate or control.should_training_stop
                or state.global_step >= state.max_steps):
            self._check(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate:
            self._check(args, state)


class CompleteLossLog(TrainerCallback):
    """Logs the training loss before every checkpoint and evaluation, and at the last step.

    The whole run's mean training loss is then the step-weighted mean of the logged losses
    (metrics.train_loss_of), which a checkpoint's log history carries across a kill and resume;
    the Trainer's own `train_loss` covers only the steps since the resume.
    """

    def on_step_end(self, args, state, control, **kwargs):
        # (with save_strategy "best" a save is decided after an evaluation: log before each one)
        if control.should_save or control.should_evaluate or state.global_step >= state.max_steps:
            control.should_log = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate:
            control.should_log = True


class SingleClassWarning(TrainerCallback):
    """Say so when an evaluation predicts one class for every example: its MCC of 0 means
    'no signal', not 'a poor model', and a bare 0 in a table hides that."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        for key, value in (metrics or {}).items():
            if key.endswith("predicted_classes") and value == 1 and state.is_world_process_zero:
                split = key.removesuffix("predicted_classes").removeprefix("eval").strip("_") or "validation"
                logger.warning("epoch %.2f: the model predicts a single class for every example of %s; "
                               "its MCC of 0 means no signal", state.epoch or 0, split)
