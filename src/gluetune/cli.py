"""The `gluetune` command: train, predict, evaluate, submit, sweep, search, params, export, report, cache.

Heavy libraries (torch, transformers) load inside the commands, after what can be checked
without them (the config file exists and parses), so a typo is reported at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .console import quiet_libraries, setup_logging
from .errors import UserError
from .training import distributed

logger = logging.getLogger("gluetune")


def _add_overrides(parser: argparse.ArgumentParser, what: str = "the config") -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help=f"override a value of {what} (YAML-parsed), repeatable: --set training.learning_rate=2e-4",
    )


def _add_config(parser: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    parser.add_argument("--config", required=required,
                        help=help or "YAML run config (sections model, dataset, peft, training)")
    _add_overrides(parser)


def _add_batch_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=int, default=64,
                        help="texts per forward pass (default 64; texts are sorted by length first)")


def _train_parser(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest complete checkpoint in the output folder (if any)")
    start.add_argument("--overwrite", action="store_true", help="delete a previous run in the output folder first")


def _predict_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", required=True, help="a gluetune output folder (or a checkpoint-N in one)")
    parser.add_argument("--config", help="the run's config: checked against the folder's task; needed only for a "
                                         "folder gluetune did not write (a plain fine-tuned model)")
    _add_overrides(parser, "the folder's saved config (e.g. dataset.max_length=128)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--input_text", help="one text to classify")
    group.add_argument("--input_file", help="one text per line, or a CSV/TSV/JSONL file with the task's columns")
    parser.add_argument("--input_text_pair", help="the second text, for pair tasks (MRPC, RTE, ...)")
    parser.add_argument("--output_file", help="where --input_file's predictions go (.tsv, .csv or .jsonl)")
    _add_batch_size(parser)


def _search_parser(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument("--space", required=True, help="YAML: section.key: {loguniform|uniform|int|choice: ...}")
    parser.add_argument("--trials", type=int, default=20, help="trials in the study, all workers together (default 20)")
    parser.add_argument("--search_dir", required=True, help="the study, one folder per trial, the summary and report")
    parser.add_argument("--jobs", type=int, help="trials at once (default: optuna: one per GPU, else 1, the cores shared "
                                                 "out; ray: as many as the cluster holds at --cpus_per_trial and "
                                                 "--gpus_per_trial)")
    parser.add_argument("--pruner", choices=("median", "halving", "none"), default="median",
                        help="stop trials that fall behind: median (Optuna's MedianPruner), halving (successive "
                             "halving; ASHA on Ray) or none (default median)")
    parser.add_argument("--startup_trials", type=int, default=3,
                        help="trials sampled at random and never pruned before the sampler and pruner learn (default 3)")
    parser.add_argument("--prune_after", type=int, default=1,
                        help="evaluations every trial completes before the pruner may stop it (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0; worker i uses seed + i)")
    parser.add_argument("--storage", help="a database URL (postgresql://user:password@host/database) to share the "
                                          "study between machines; default: a journal file in --search_dir")
    parser.add_argument("--study_name", default="gluetune-search",
                        help="the study's name in --storage: one per search on a shared server (default gluetune-search)")
    parser.add_argument("--dashboard", nargs="?", type=int, const=0, metavar="PORT",
                        help="serve optuna-dashboard (Optuna's web UI) on 127.0.0.1:PORT while the search runs "
                             "(default: a free port); the optuna engine")
    parser.add_argument("--engine", choices=("optuna", "ray"), default="optuna",
                        help="optuna (worker processes here, default) or ray (trials on a Ray cluster)")
    parser.add_argument("--address", help="--engine ray: the cluster (default RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--cpus_per_trial", type=float, default=1, help="--engine ray: CPUs per trial (default 1)")
    parser.add_argument("--gpus_per_trial", type=float, default=0, help="--engine ray: GPUs per trial (default 0)")
    parser.add_argument("--confirm_seeds", help="re-run the best trial(s) with these seeds (e.g. 1,2,3)")
    parser.add_argument("--confirm_top", type=int, default=1, help="how many of the best trials to confirm (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gluetune", description="Parameter-efficient fine-tuning on GLUE-style tasks")
    commands = parser.add_subparsers(dest="command", required=True)

    _train_parser(commands.add_parser("train", help="train a model from a config"))
    _predict_parser(commands.add_parser("predict", help="classify texts with a trained output folder"))

    evaluate = commands.add_parser("evaluate", help="validation metrics of trained output folders, as one GLUE table")
    evaluate.add_argument("--model_path", nargs="+", required=True, help="one or more gluetune output folders")
    _add_overrides(evaluate, "each folder's saved config (e.g. dataset.data_dir=/data/glue)")
    _add_batch_size(evaluate)

    submit = commands.add_parser("submit", help="predict GLUE test sets and write the leaderboard's submission files")
    submit.add_argument("--model_path", nargs="+", required=True, help="gluetune output folders, one per GLUE task")
    submit.add_argument("--output_dir", required=True, help="where the <TASK>.tsv files and submission.zip go")
    _add_overrides(submit, "each folder's saved config (e.g. dataset.data_dir=/data/glue)")
    _add_batch_size(submit)

    sweep = commands.add_parser("sweep", help="one config over several seeds and a small grid; a median summary")
    _add_config(sweep, required=False)
    sweep.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                       help="values to try, repeatable (the grid is their cartesian product)")
    sweep.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    sweep.add_argument("--sweep_dir", required=True, help="one folder per setting and seed, plus summary.csv/.md")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at once (default 1; the cores are shared out)")
    sweep.add_argument("--rerun", metavar="SETTING", help="train a summary row's runs again from their records")
    sweep.add_argument("--rerun_dir", help="where --rerun's runs go (default <sweep_dir>/rerun)")

    _search_parser(commands.add_parser("search", help="search a space of --set values (Optuna here, or a Ray "
                                                      "cluster); prune trials that fall behind, confirm the best"))

    params = commands.add_parser("params", help="count trainable parameters from the model's config alone (no weights)")
    _add_config(params)

    export = commands.add_parser("export", help="a standalone model folder: LoRA merged, loads with plain transformers")
    export.add_argument("--model_path", required=True, help="a finished gluetune output folder")
    export.add_argument("--output_dir", required=True, help="the new model folder (must not exist or be empty)")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="weights' precision in the export (default fp32)")

    report = commands.add_parser("report", help="(re)draw a run's report.md and figures, or a sweep's or a search's")
    report.add_argument("folder", help="a finished gluetune output folder, a sweep folder or a search folder")
    report.add_argument("--storage", help="a search in a database: its URL with the password, where the search "
                                          "folder's URL (saved without it) does not connect")

    cache = commands.add_parser("cache", help="where the tokenization cache is and how big; --clear empties it")
    cache.add_argument("--clear", action="store_true", help="delete every cached tokenized split")
    return parser


def run_train(args) -> int:
    from .config import apply_overrides, load_config, read_yaml_file
    from .model.quantization import wait_passively_on_cpu

    raw = read_yaml_file(args.config)  # a missing or malformed file is reported before torch loads
    wait_passively_on_cpu(apply_overrides(raw, args.overrides))
    quiet_libraries()
    config = load_config(args.config, args.overrides)
    config.control.resume = "auto" if args.resume else config.control.resume
    config.control.overwrite = args.overwrite or config.control.overwrite

    import torch

    from .training.run import train
    from .training.speed.cpu import prepare_cpu_process

    if not torch.cuda.is_available():
        prepare_cpu_process(config.training)  # process-wide: applied by the command, never by the library
    train(config)
    return 0


def run_predict(args) -> int:
    from .config import load_config, read_yaml_file

    if args.config:
        read_yaml_file(args.config)
    quiet_libraries()
    from .data.loading import read_input_file
    from .results.prediction import Classifier, saved_config, write_predictions

    given = load_config(args.config, args.overrides) if args.config else None
    saved = saved_config(args.model_path, args.overrides)
    if saved is not None and given is not None and given.task.name != saved.task.name:
        raise UserError(f"--config {args.config} is for task '{given.task.name}', but {args.model_path} was trained "
                        f"for '{saved.task.name}'; drop --config (the folder's own config is used)")
    if saved is None and given is None and args.overrides:
        raise UserError(f"--set needs a config to apply to: {args.model_path} has none; add --config")
    classifier = Classifier.from_folder(args.model_path, config=given if saved is None else None,
                                        overrides=args.overrides, batch_size=args.batch_size)
    task = classifier.task
    if args.input_text is not None:
        texts = [(args.input_text,) if args.input_text_pair is None else (args.input_text, args.input_text_pair)]
        prediction = classifier.predict(texts)[0]
        if prediction.probability is None:
            print(f"score={prediction.label:.4f}")
        else:
            print(f"label={prediction.label} probability={prediction.probability:.4f}")
        return 0
    if not args.output_file:
        raise UserError("--input_file needs --output_file (where the predictions go)")
    texts = read_input_file(args.input_file, task)
    predictions = classifier.predict(texts)
    write_predictions(args.output_file, texts, predictions, task.text_columns)
    logger.info("wrote %d predictions to %s", len(predictions), args.output_file)
    return 0


def run_evaluate(args) -> int:
    quiet_libraries()
    from .results.evaluation import evaluate_folders, glue_table

    print(glue_table(evaluate_folders(args.model_path, args.overrides, batch_size=args.batch_size)))
    return 0


def run_submit(args) -> int:
    quiet_libraries()
    from .results.submission import write_submission

    report = write_submission(args.model_path, args.output_dir, args.overrides, batch_size=args.batch_size)
    print(report.summary())
    return 0


def run_sweep(args) -> int:
    from pathlib import Path

    from .search import sweep

    sweep_dir = Path(args.sweep_dir)
    if args.rerun:
        target = Path(args.rerun_dir) if args.rerun_dir else sweep_dir / "rerun"
        for seed, recorded, reproduced in sweep.rerun_setting(sweep_dir, args.rerun, target):
            print(f"{args.rerun} seed {seed}: recorded {recorded:.4f}, reproduced {reproduced:.4f}"
                  f"{'' if abs(recorded - reproduced) < 1e-6 else ' (DIFFERS)'}")
        return 0
    if not args.config:
        raise UserError("sweep needs --config (or --rerun SETTING to repeat a finished row)")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected a positive integer")
    from .config import read_yaml_file

    read_yaml_file(args.config)
    quiet_libraries()
    settings = sweep.parse_grid(args.grid)
    rows = sweep.run_sweep(args.config, args.overrides, settings, sweep.parse_seeds(args.seeds), sweep_dir, args.jobs)
    print(sweep.markdown_table(rows), end="")
    print(f"summary: {sweep_dir / sweep.SUMMARY_MD} and {sweep_dir / sweep.SUMMARY_CSV}")
    return 0


def run_search(args) -> int:
    from pathlib import Path

    from .config import load_config, read_yaml_file
    from .config.arguments import lower_is_better
    from .search import storage as databases
    from .search import study
    from .search.space import check_against_config, read_space

    for name in ("trials", "jobs", "startup_trials", "confirm_top", "prune_after"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "startup_trials" else 1):
            expected = "a non-negative integer" if name == "startup_trials" else "a positive integer"
            raise UserError(f"--{name} {getattr(args, name)}: expected {expected}")
    read_yaml_file(args.config)
    study.require_optuna()  # both engines: Ray Tune searches with Optuna's sampler
    if args.engine == "ray":
        from .search import ray_tune

        ray_tune.require_ray()
        if args.dashboard is not None:
            raise UserError("--dashboard is for the optuna engine; a Ray search shows in Ray's own dashboard "
                            "(ray start --head --include-dashboard true)")
    space = read_space(args.space)
    seeds = None
    if args.confirm_seeds:
        from .search.sweep import parse_seeds

        seeds = parse_seeds(args.confirm_seeds, "--confirm_seeds")
    quiet_libraries()
    config = load_config(args.config, args.overrides)
    check_against_config(space, args.config, args.overrides)
    metric = config.task.primary_metric
    spec = study.SearchSpec(
        config=str(Path(args.config).resolve()), overrides=list(args.overrides), space=space.to_dict(),
        space_source=str(Path(args.space).resolve()), metric=metric,
        direction="minimize" if lower_is_better(metric) else "maximize", search_dir=str(Path(args.search_dir).resolve()),
        trials=args.trials, pruner=args.pruner, startup_trials=args.startup_trials,
        prune_after=args.prune_after, seed=args.seed,
        storage=databases.with_driver(args.storage) if args.storage else None, study_name=args.study_name,
        engine=args.engine, jobs=args.jobs)
    dashboards = []

    def serve_dashboard(store):
        from .search.dashboard import serve

        dashboards.append(serve(store, args.dashboard))
        logger.info("dashboard: %s (while this command runs)", dashboards[0].url)

    try:
        if args.engine == "ray":
            ray_tune.run_search(spec, args.jobs, args.address, args.cpus_per_trial, args.gpus_per_trial)
        else:
            study.run_search(spec, args.jobs, config.to_dict(), serve_dashboard if args.dashboard is not None else None)
        _print_search_results(spec, seeds, args)
    finally:
        for dashboard in dashboards:
            dashboard.stop()
    return 0


def _print_search_results(spec, seeds: list[int] | None, args) -> None:
    from .search import study, trials

    rows = study.summarize(spec)
    if not rows:
        raise UserError(f"the search in {spec.folder} has no trials yet")
    print(trials.trials_markdown(rows), end="")
    found = json.loads((spec.folder / trials.IMPORTANCES_FILENAME).read_text())  # summarize wrote it
    if found:
        print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()))
    best = spec.folder / trials.BEST_CONFIG_FILENAME
    if best.is_file():
        print(f"best setting: {best} (gluetune train --config {best})")
    if seeds:
        for entry in study.confirm(spec, seeds, args.confirm_top, args.jobs or 1):
            print("confirmed: " + trials.describe_confirmation(entry, spec.metric))
    print(f"report: {spec.folder / 'report.md'}")


def run_params(args) -> int:
    from .config import load_config, read_yaml_file

    read_yaml_file(args.config)
    quiet_libraries()
    from .model.classifier import classifier_from_config, describe_parameters, make_trainable

    config = load_config(args.config, args.overrides)
    model = make_trainable(classifier_from_config(config), config)
    print(describe_parameters(model))
    return 0


def run_export(args) -> int:
    quiet_libraries()
    from .results.export import export_folder

    folder = export_folder(args.model_path, args.output_dir, dtype=args.dtype)
    print(f"exported to {folder}: load with AutoModelForSequenceClassification.from_pretrained({str(folder)!r}"
          f"{', trust_remote_code=True' if (folder / 'modeling_gluetune.py').is_file() else ''})")
    return 0


def run_report(args) -> int:
    from pathlib import Path

    from .search import study
    from .search.report import write_report

    folder = Path(args.folder)
    spec = study.SearchSpec.read(folder, storage=args.storage) if (folder / study.SPEC_FILENAME).is_file() else None
    if spec is not None and (args.storage or spec.storage):
        # A search in a database: the table again from the study, with every machine's trials.
        try:
            study.summarize(spec)
        except UserError as err:
            logger.warning("%s; the report shows the trials as this machine last wrote them", err)
    print(f"wrote {write_report(folder)}")
    return 0


def run_cache(args) -> int:
    from .data.tokenizing import tokenization_cache

    folder, entries, size = tokenization_cache(clear=args.clear)
    if args.clear:
        print(f"cleared {entries} cached split(s), {size / 2**20:.1f} MiB, from {folder}")
    else:
        print(f"{folder}: {entries} cached split(s), {size / 2**20:.1f} MiB (set GLUETUNE_CACHE_DIR to move it; "
              "gluetune cache --clear empties it)")
    return 0


COMMANDS = {
    "train": run_train, "predict": run_predict, "evaluate": run_evaluate, "submit": run_submit, "sweep": run_sweep,
    "search": run_search, "params": run_params, "export": run_export, "report": run_report, "cache": run_cache,
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line. `prog` names a single command's own script (train.py, inference.py)."""
    if prog is None:
        args = build_parser().parse_args(argv)
    else:
        command, *rest = argv
        parser = argparse.ArgumentParser(prog=prog, description=f"the same as `gluetune {command}`")
        {"train": _train_parser, "predict": _predict_parser}[command](parser)
        args = parser.parse_args(rest)
        args.command = command
    # In a multi-process run only the main process speaks; the others report errors only.
    setup_logging(distributed.is_main_process())
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        # In a multi-process run, an error every process raised (a config error, a decision taken
        # together) is said once, by the main process; one only this process met, by it.
        if distributed.is_main_process():
            print(f"gluetune: error: {err}", file=sys.stderr)
        elif distributed.initialized() and not err.shared:
            print(f"gluetune: error: [rank {distributed.launched_rank()}] {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("gluetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
