"""One run: the config's data and model into the Hugging Face Trainer, to a finished folder.

`run` (train(): the steps of a run, in every process of a multi-process job), `training_args` (the
config's TrainingArguments on this machine), `trainer` (the Trainer with what gluetune adds),
`callbacks` and `progress` (stopping, divergence, TensorBoard, what a run prints), `outputdir`
(one writer, resumable checkpoints, the run record), `distributed` (deciding once for N processes),
`optimizers` (bitsandbytes' optimizers), `speed/` (the fast path, CUDA graphs, CPU speed-ups).

Nothing is imported here: `gluetune.training.distributed` must not load torch with the Trainer.
"""
