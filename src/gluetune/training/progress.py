"""What a run shows while it runs: progress bars in a terminal, one plain line per event elsewhere.

In a terminal: a training bar (steps, epoch, loss, rate, time left) and, for evaluations of more
than a few batches, an evaluation bar that goes away when done. In a log file (not a terminal):
no bars, one line per logging step. Either way each evaluation prints one aligned line of the
task's metrics, so epochs read as a table.
"""

from __future__ import annotations

import logging
import sys
import time

from transformers import TrainerCallback

from ..console import BAR_MIN_BATCHES, interactive, metrics_line

logger = logging.getLogger("gluetune")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class ConsoleProgress(TrainerCallback):
    """Replaces the Trainer's ProgressCallback / PrinterCallback (which print raw dicts of strings)."""

    def __init__(self, metric_names: list[str]):
        self.metric_names = metric_names  # the task's metrics, in the order they are shown
        self.bars = interactive()
        self.training_bar = None
        self.eval_bar = None
        self.started = None
        self.first_step = 0

    def _write(self, line: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(line, file=sys.stderr)
        else:
            logger.info("%s", line)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.started, self.first_step = time.time(), state.global_step
        if self.bars:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                     dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.training_bar.n)
            self.training_bar.set_postfix_str(f"epoch {state.epoch or 0:.2f}/{args.num_train_epochs:g}", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        if self.training_bar is not None:
            self.training_bar.set_postfix_str(
                f"epoch {state.epoch or 0:.2f}/{args.num_train_epochs:g} loss {logs['loss']:.4f}", refresh=True)
            return
        done = state.global_step - self.first_step
        elapsed = time.time() - self.started if self.started else 0.0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (state.max_steps - state.global_step) / rate if rate > 0 else 0.0
        lr = logs.get("learning_rate")
        logger.info("step %d/%d | epoch %.2f | loss %.4f%s | %.2f steps/s, %s left", state.global_step, state.max_steps,
                    state.epoch or 0, logs["loss"], f" | lr {lr:.2e}" if lr is not None else "", rate, _duration(left))

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self.bars or not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            from tqdm.auto import tqdm

            total = len(eval_dataloader) if eval_dataloader is not None else None
            self.eval_bar = tqdm(total=total, desc="evaluate", leave=False, dynamic_ncols=True, file=sys.stderr,
                                 disable=total is not None and total < BAR_MIN_BATCHES)
        self.eval_bar.update(1)

    def _close_eval_bar(self):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._close_eval_bar()
        if not state.is_world_process_zero or not metrics:
            return
        # Several validation sets (MNLI): one line each, metrics prefixed by the split's name.
        prefixes = sorted({k[: -len("_loss")] for k in metrics if k.endswith("_loss")})
        for prefix in prefixes:
            values = {k.removeprefix(f"{prefix}_"): v for k, v in metrics.items() if k.startswith(f"{prefix}_")}
            where = prefix.removeprefix("eval").strip("_") or "validation"
            label = f"epoch {state.epoch or 0:5.2f}/{args.num_train_epochs:g} {where}"
            self._write(metrics_line(label, values, ["loss", *self.metric_names]))

    def on_predict(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None
