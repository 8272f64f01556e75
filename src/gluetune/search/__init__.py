"""Many runs: `gluetune sweep` (seeds x a grid, `sweep`, `summary`) and `gluetune search` (a space
of `--set` values on Optuna, `study`, or Ray Tune, `ray_tune`; `space`, `trials`, `worker`; a
trial's run watched by either engine, `trialrun`; a study in a database, `storage`; watched live,
`dashboard`). Each run is a `gluetune train` process (`runner`) whose folder is read back; `report`
draws the report of a run, a sweep or a search folder."""
