"""One trial's run, watched the same way by both engines (Optuna's workers, Ray Tune's trials).

The run is a normal gluetune run in the trial's folder (runner.RunProcess). `evaluations()` gives
each evaluation as the run writes it, to be reported to the engine and judged by its pruner, but
never the run's last one (`runner.is_last_evaluation`: at the Trainer's last optimizer step, however
the config sets the length), nor any once the last is written: a stop then would save nothing but the
final metrics, or cut them short. `prune()` stops
the run through its graceful stop (a checkpoint) and says why in its record and log; `finish()`
waits for the run and records how it ended. The record (`trials.TrialRecord`) is written to the
trial's folder and handed to `publish` (the Optuna engine keeps it in the study too, where every
machine reads it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from . import trials
from .runner import RunProcess, final_score, is_last_evaluation, progress

logger = logging.getLogger("gluetune")

POLL_S = 0.5


class TrialRun:
    def __init__(self, record: trials.TrialRecord, run: RunProcess, metric: str,
                 publish: Callable[[trials.TrialRecord], None] | None = None):
        self.record, self.run, self.metric, self.publish = record, run, metric, publish
        self.offered = 0  # evaluations handed to the engine so far

    @classmethod
    def start(cls, record: trials.TrialRecord, config: str, overrides: list[str], metric: str, cwd: str,
              env: dict | None = None, publish=None) -> TrialRun:
        """`overrides` must put the run's output_dir at the record's folder."""
        watch = cls(record, None, metric, publish)
        watch.save()
        watch.run = RunProcess.start(config, overrides, Path(record.folder), env=env, cwd=cwd)
        return watch

    def save(self) -> None:
        self.record.save()
        if self.publish is not None:
            self.publish(self.record)

    def resume_count(self, offered: int) -> None:
        """A restored trial (Ray) continues counting where it stopped: its evaluations so far were reported."""
        rows, _ = progress(self.run.folder)
        self.offered = min(offered, len(rows))
        self.record.curve = [row.get(self.metric) for row in rows[:self.offered]]

    def evaluations(self, stopping: Callable[[], bool] = lambda: False):
        """(n, value) for each new evaluation while the run lives, but not its last; ends when the
        run has ended (then `finish`) or `stopping()` says so (then `stop`)."""
        while not stopping():
            code = self.run.poll()  # before the records: once it has ended, they are complete
            if code is not None:
                return
            rows, max_steps = progress(self.run.folder)
            if any(is_last_evaluation(row, max_steps) for row in rows):
                # Ending by itself (a fast run can write several evaluations between two polls): a
                # stop now would cut its final save short; `finish` hands its evaluations to the engine.
                return
            while self.offered < len(rows):
                value = rows[self.offered].get(self.metric)
                self.offered += 1
                self.record.curve.append(value)
                yield self.offered, value
                if stopping():
                    return
            time.sleep(POLL_S)

    def prune(self, reason: str) -> None:
        """Stop the run gracefully (a checkpoint) because the engine's pruner said so."""
        self.run.stop()
        last = self.record.curve[-1] if self.record.curve else None
        self._finish("pruned", last, reason + (f" ({self.metric} {last:.4f})" if last is not None else ""))
        logger.info("trial %d: %s", self.record.number, self.record.reason)

    def stop(self, why: str) -> None:
        """Stop the run gracefully (a checkpoint) and leave the trial unfinished: it resumes later."""
        self.run.stop()
        self.record.log(why)

    def finish(self) -> str:
        """Wait for the run and record how it ended: 'complete' (its score in `record.value`) or 'failed'."""
        code = self.run.wait()
        self.record.curve = [row.get(self.metric) for row in progress(self.run.folder)[0]]
        if code != 0:
            self._finish("failed", None, f"exit {code}: {self.run.last_log_line()}")
            logger.warning("trial %d: failed (%s)", self.record.number, self.record.reason)
            return "failed"
        score = final_score(self.run.folder)
        self._finish("complete", score, "")
        logger.info("trial %d: %s %.4f (%.0f s)", self.record.number, self.metric, score, self.run.seconds)
        return "complete"

    def _finish(self, state: str, value: float | None, reason: str) -> None:
        self.record.finish(state, value, self.run.seconds, reason)
        if self.publish is not None:
            self.publish(self.record)
