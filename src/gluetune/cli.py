"""The `gluetune` command: train, predict, evaluate, submit, sweep, params."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .errors import UserError

logger = logging.getLogger("gluetune")


def _add_config(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML run config (sections model, dataset, peft, training)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML-parsed), repeatable: --set training.learning_rate=2e-4",
    )


def _add_saved_config_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the saved config, e.g. --set dataset.data_dir=/data/glue")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gluetune", description="Parameter-efficient fine-tuning on GLUE-style tasks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a config")
    _add_config(train)
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest complete checkpoint in the output folder (if any)")
    start.add_argument("--overwrite", action="store_true", help="delete a previous run in the output folder first")

    predict = commands.add_parser("predict", help="classify texts with a trained output folder")
    _add_config(predict, required=False)
    predict.add_argument("--model_path", required=True, help="a gluetune output folder")
    group = predict.add_mutually_exclusive_group(required=True)
    group.add_argument("--input_text", help="one text to classify")
    group.add_argument("--input_file", help="one text per line, or a CSV/TSV/JSONL file with the task's columns")
    predict.add_argument("--input_text_pair", help="the second text, for pair tasks (MRPC, RTE, ...)")
    predict.add_argument("--output_file", help="where --input_file's predictions go (.tsv, .csv or .jsonl)")
    predict.add_argument("--batch_size", type=int, default=64)

    evaluate = commands.add_parser("evaluate", help="validation metrics of trained output folders, as one GLUE table")
    evaluate.add_argument("--model_path", nargs="+", required=True, help="one or more gluetune output folders")
    _add_saved_config_overrides(evaluate)
    evaluate.add_argument("--batch_size", type=int, default=64)

    submit = commands.add_parser("submit", help="predict GLUE test sets and write the leaderboard's submission files")
    submit.add_argument("--model_path", nargs="+", required=True, help="gluetune output folders, one per GLUE task")
    submit.add_argument("--output_dir", required=True, help="where the <TASK>.tsv files and submission.zip go")
    _add_saved_config_overrides(submit)
    submit.add_argument("--batch_size", type=int, default=64)

    sweep = commands.add_parser("sweep", help="one config over several seeds and a small grid; a median summary")
    _add_config(sweep, required=False)
    sweep.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                       help="values to try, repeatable (the grid is their cartesian product)")
    sweep.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    sweep.add_argument("--sweep_dir", required=True, help="one folder per setting and seed, plus summary.csv/.md")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at once (default 1; the cores are shared out)")
    sweep.add_argument("--rerun", metavar="SETTING", help="train a summary row's runs again from their records")
    sweep.add_argument("--rerun_dir", help="where --rerun's runs go (default <sweep_dir>/rerun)")

    params = commands.add_parser("params", help="count trainable parameters from the model's config alone (no weights)")
    _add_config(params)
    return parser


def run_train(args) -> int:
    from .config import load_config
    from .training import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("training.resume_from_checkpoint=auto")
    if args.overwrite:
        overrides.append("training.overwrite_output_dir=true")
    train(load_config(args.config, overrides))
    return 0


def run_predict(args) -> int:
    from .config import load_config
    from .data import read_input_file
    from .prediction import Classifier, write_predictions

    config = load_config(args.config, args.overrides) if args.config else None
    classifier = Classifier.from_folder(args.model_path, config=config, batch_size=args.batch_size)
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
    from .evaluation import evaluate_folders, glue_table

    print(glue_table(evaluate_folders(args.model_path, args.overrides, batch_size=args.batch_size)))
    return 0


def run_submit(args) -> int:
    from .submission import write_submission

    report = write_submission(args.model_path, args.output_dir, args.overrides, batch_size=args.batch_size)
    print(report.summary())
    return 0


def run_sweep(args) -> int:
    from pathlib import Path

    from . import sweep

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
    settings = sweep.parse_grid(args.grid)
    rows = sweep.run_sweep(args.config, args.overrides, settings, sweep.parse_seeds(args.seeds), sweep_dir, args.jobs)
    print(sweep.markdown_table(rows), end="")
    print(f"summary: {sweep_dir / sweep.SUMMARY_MD} and {sweep_dir / sweep.SUMMARY_CSV}")
    return 0


def run_params(args) -> int:
    from .config import load_config
    from .models import classifier_from_config, describe_parameters, make_trainable

    config = load_config(args.config, args.overrides)
    model = make_trainable(classifier_from_config(config), config)
    print(describe_parameters(model))
    return 0


COMMANDS = {
    "train": run_train, "predict": run_predict, "evaluate": run_evaluate, "submit": run_submit, "sweep": run_sweep,
    "params": run_params,
}


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[gluetune] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library deprecation chatter (transformers v5 renames, pyarrow options) is not the user's to fix.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # weight-loading bars; the Trainer's own stay
        datasets.disable_progress_bars()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"gluetune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("gluetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
