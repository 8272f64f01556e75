"""The GPU fast path's pieces, on the CPU: padded length buckets with filler rows that change nothing,
every example once per epoch, one micro-batch per step in place of accumulation, the compiled layers,
and the same losses as the plain path."""

from __future__ import annotations

import pytest
import torch
from conftest import REFERENCE_CONFIG, UNEVEN_SIZE, assert_same_training, run_main, tiny_overrides, tiny_training_pieces

from gluetune.config.run import load_config
from gluetune.results import metrics
from gluetune.training.run import train
from gluetune.training.speed import fastpath
from gluetune.training.trainer import GluetuneTrainer


def trainer_for(tiny_qwen, tmp_path, *extra: str):
    config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / "run", **UNEVEN_SIZE)
                         + ["peft.lora_dropout=0", "training.report_to=none", *extra])
    args, tokenizer, model, train_set = tiny_training_pieces(config)
    trainer = GluetuneTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=train_set,
                              data_collator=fastpath.collator(config, tokenizer, args, False),
                              train_collator=fastpath.collator(config, tokenizer, args, False, training=True),
                              compute_metrics=metrics.trainer_metrics_fn(config.task))
    return config, trainer, train_set


STSB = ["dataset.subset=stsb", "model.num_labels=1", "dataset.num_labels=1", "dataset.text_column=null",
        "training.metric_for_best_model=null", "training.greater_is_better=null"]


@pytest.mark.parametrize("task", ["cola", "stsb"])
def test_buckets_and_filler_rows(tiny_qwen, tmp_path, task):
    _, trainer, train_set = trainer_for(tiny_qwen, tmp_path, "training.fast_path=true", *(STSB if task == "stsb" else []))
    collate = trainer.train_collator
    features = [{"input_ids": train_set[i]["input_ids"], "attention_mask": train_set[i]["attention_mask"],
                 "labels": train_set[i]["label"]} for i in range(5)]
    batch = collate(features)
    assert batch["input_ids"].shape[0] == 32 and batch["input_ids"].shape[1] % fastpath.BUCKET == 0
    assert (batch["labels"][5:] == -100).all() and (batch["labels"][:5] != -100).all()
    assert (batch["attention_mask"][5:].sum(dim=1) == 1).all()  # one attended token: no all-masked row

    # filler rows add no loss and no gradient: the same as the 5 real rows alone
    model = trainer.model.train()
    plain = trainer.data_collator(features)
    losses, grads = [], []
    for inputs in (plain, batch):
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(5))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_an_epoch_on_the_fast_path_uses_every_example_once(tiny_qwen, tmp_path):
    config, trainer, train_set = trainer_for(tiny_qwen, tmp_path, "training.fast_path=true",
                                             "dataset.max_train_samples=83")  # 83 = 2 x 32 + 19: a short last step
    assert trainer.args.per_device_train_batch_size == 32 and trainer.args.gradient_accumulation_steps == 1
    assert config.training["per_device_train_batch_size"] == 16  # the config keeps what the user wrote
    real_lengths, shapes = [], set()
    for batch in trainer.get_train_dataloader():
        shapes.add(tuple(batch["input_ids"].shape))
        real = batch["labels"] != -100
        real_lengths += batch["attention_mask"][real].sum(dim=1).tolist()
    assert sorted(real_lengths) == sorted(train_set["length"])  # each example once, none lost
    assert all(rows == 32 and width % fastpath.BUCKET == 0 for rows, width in shapes)


def test_the_fast_path_learns_what_the_plain_path_learns(tiny_qwen, tmp_path, monkeypatch):
    """Same optimizer steps over the same examples: per-step losses and final logits agree to float
    rounding (1e-4; summation order differs between 16 x 2 and 32 x 1). Compilation is counted here,
    not run (it costs minutes on 2 cores; the slow test below runs it)."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((type(self).__name__, kwargs)))
    runs = plain_and_fast_runs(tiny_qwen, tmp_path)
    assert [c[0] for c in compiled] == ["Qwen2DecoderLayer", "Qwen2DecoderLayer"]
    assert compiled[0][1] == {"dynamic": False}  # no mode="reduce-overhead": it crashed on CUDA (fastpath docstring)
    assert_same_training(runs["plain"], runs["fast"], rel=1e-4)


def plain_and_fast_runs(tiny_qwen, tmp_path) -> dict:
    """The same tiny run on the plain path and on the fast path: {name: (folder, metrics)}."""
    runs = {}
    for name, extra in (("plain", []), ("fast", ["training.fast_path=true"])):
        out = tmp_path / name
        config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, **UNEVEN_SIZE) + ["peft.lora_dropout=0", *extra])
        runs[name] = (out, train(config).metrics)
    return runs


@pytest.mark.slow
def test_with_dropout_a_fast_run_is_another_seed_of_the_plain_run(minilm_path, tmp_path, monkeypatch):
    """With dropout (the reference config's lora_dropout 0.1) the fast path draws other masks than the
    plain path with the same seed: the random stream is used in an order that depends on the shapes
    (bucket padding, filler rows, one 32-row micro-batch in place of two of 16). So a fast run is
    another run of the same recipe: per seed its final validation logits differ from the plain run's
    (without dropout they agree to 1e-4), and its validation MCC falls within the spread between seeds. MiniLM + LoRA (the CPU default's) on a slice of
    real SST-2 that it learns in two epochs, 4 seeds of each; layers uncompiled here (the order of the
    masks, not the compiler, is the point; inductor would take minutes on 2 cores)."""
    import json
    from statistics import mean

    from conftest import CPU_CONFIG, GLUE_DIR

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    runs = {"plain": [], "fast": []}
    for seed in (1, 2, 3, 4):
        for name, extra in (("plain", []), ("fast", ["training.fast_path=true"])):
            overrides = [f"model.name_or_path={minilm_path}", f"dataset.data_dir={GLUE_DIR}", "dataset.subset=sst2",
                         "dataset.max_train_samples=512", "dataset.max_eval_samples=256", "training.num_train_epochs=2",
                         "peft.lora_dropout=0.1", f"training.seed={seed}", "training.per_device_train_batch_size=16",
                         "training.gradient_accumulation_steps=2", f"training.output_dir={tmp_path / name / str(seed)}",
                         "training.report_to=none", *extra]
            summary = train(load_config(CPU_CONFIG, overrides)).metrics
            predictions = (tmp_path / name / str(seed) / "validation_predictions.jsonl").read_text().splitlines()
            runs[name].append((summary["validation"]["matthews_correlation"],
                               torch.tensor([json.loads(line)["logits"] for line in predictions])))
    mcc = {name: [m for m, _ in values] for name, values in runs.items()}
    apart = [float((fast - plain).abs().max()) for (_, plain), (_, fast) in zip(runs["plain"], runs["fast"])]
    print(f"\nSST-2, 512 sentences, 2 epochs, lora_dropout 0.1, seeds 1-4: validation MCC plain "
          f"{[round(m, 4) for m in mcc['plain']]}, fast {[round(m, 4) for m in mcc['fast']]}; largest logit "
          f"difference per seed {[round(a, 4) for a in apart]}")
    assert all(m > 0.3 for values in mcc.values() for m in values), mcc  # both learned
    assert all(a > 1e-3 for a in apart), apart  # not the same run (it is, to 1e-4, without dropout)
    # Same distribution: the means differ by less than the spread within either path (for two samples of
    # 4 from one normal distribution this fails about 1 time in 100).
    spread = max(max(values) - min(values) for values in mcc.values())
    assert abs(mean(mcc["fast"]) - mean(mcc["plain"])) <= spread, mcc


@pytest.mark.slow
def test_the_compiled_fast_path_learns_what_the_plain_path_learns(tiny_qwen, tmp_path):
    """Regional torch.compile (inductor on the CPU) of the decoder layers: minutes to compile here."""
    runs = plain_and_fast_runs(tiny_qwen, tmp_path)
    assert_same_training(runs["plain"], runs["fast"], rel=1e-4)


def test_a_failing_compilation_trains_on_the_plain_path_with_nothing_lost(tiny_qwen, tmp_path, monkeypatch, caplog):
    """The compiled layer raises (as a compiler on a GPU did): the rehearsal before training catches
    it, one line says so, and the run ends with the plain run's metrics."""

    def compile_that_fails(self, **kwargs):
        def broken(*args, **kw):
            raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten\nsecond line")

        self._compiled_call_impl = broken

    monkeypatch.setattr(torch.nn.Module, "compile", compile_that_fails)
    with caplog.at_level("WARNING", logger="gluetune"):
        runs = plain_and_fast_runs(tiny_qwen, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "rehearsal before training failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "failed on a training batch of 32 x 16 tokens (RuntimeError: accessing tensor output" in warnings[0]
    assert_same_training(runs["plain"], runs["fast"], rel=1e-4)


def test_only_the_repeated_layers_are_compiled(tiny_qwen, minilm_path):
    """The regions are the classes a model names in `_no_split_modules` that occur more than once: BERT
    names its embeddings too, which would make graphs of their own for every shape, shared with nothing."""
    from transformers import AutoModelForSequenceClassification

    for path, layer, count in ((minilm_path, "BertLayer", 6), (tiny_qwen, "Qwen2DecoderLayer", 2)):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        assert [type(m).__name__ for m in fastpath.compile_regions(model)] == [layer] * count


def test_the_rehearsal_changes_no_weight_gradient_random_stream_or_step(tiny_qwen, tmp_path):
    _, trainer, train_set = trainer_for(tiny_qwen, tmp_path, "training.fast_path=true", "peft.lora_dropout=0.1")
    model = trainer.model
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    random_state = torch.get_rng_state()
    train_batches, eval_batches = fastpath.rehearsal_batches(trainer, train_set, [train_set.sort("length")])
    assert fastpath.rehearse(trainer, train_batches, eval_batches, fastpath.compile_regions(model))  # eager layers here
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), random_state)  # dropout drew from it, and it was put back
    assert all(p.grad is None for p in model.parameters())
    assert trainer.state.global_step == 0 and trainer.optimizer is None


def test_the_step_plan_has_every_shape_an_epoch_uses(tiny_qwen, tmp_path):
    """One rehearsal batch (and, with CUDA graphs, one captured graph) per shape the epoch's training
    and evaluation batches have, each real (the collators' own output)."""
    _, trainer, train_set = trainer_for(tiny_qwen, tmp_path, "training.fast_path=true", "dataset.max_train_samples=83")
    evals = train_set.sort("length")
    train_batches, eval_batches = fastpath.rehearsal_batches(trainer, train_set, [evals])
    plan = [tuple(b["input_ids"].shape) for b in train_batches]
    # every bucket an example's length falls in, the full micro-batch's rows each
    assert plan == sorted({(32, fastpath.padded(n)) for n in train_set["length"]})
    assert {tuple(b["input_ids"].shape) for b in trainer.get_train_dataloader()} <= set(plan)
    assert {tuple(b["input_ids"].shape) for b in trainer.get_eval_dataloader(evals)} == {
        tuple(b["input_ids"].shape) for b in eval_batches}
    assert all((b["labels"] != -100).any() for b in train_batches)


def test_cuda_graphs_need_the_fast_path_and_a_gpu(tiny_qwen, tmp_path):
    from conftest import as_set_args, assert_one_line_error

    from gluetune.errors import UserError

    with pytest.raises(UserError, match=r"training.cuda_graphs needs training.fast_path: true"):
        load_config(REFERENCE_CONFIG, ["training.cuda_graphs=true"])
    overrides = tiny_overrides(tiny_qwen, tmp_path / "run") + ["training.fast_path=true", "training.cuda_graphs=true"]
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *as_set_args(overrides))
    assert_one_line_error(result, "training.cuda_graphs", "need a CUDA GPU", "cuda_graphs=false")
    assert not (tmp_path / "run").exists()


def test_fast_path_keeps_an_explicit_evaluation_batch(tiny_qwen, tmp_path):
    from gluetune.config.arguments import FAST_PATH_EVAL_BATCH
    from gluetune.training.run import training_arguments

    def eval_batch(*extra):
        overrides = tiny_overrides(tiny_qwen, tmp_path / "run") + ["training.fast_path=true", *extra]
        return training_arguments(load_config(REFERENCE_CONFIG, overrides), quiet=True).per_device_eval_batch_size

    assert eval_batch() == FAST_PATH_EVAL_BATCH
    assert eval_batch("training.per_device_eval_batch_size=4") == 4


def test_random_sampling_keeps_the_training_collator(tiny_qwen, tmp_path):
    _, trainer, _ = trainer_for(tiny_qwen, tmp_path, "training.fast_path=true", "training.train_sampling_strategy=random")
    assert trainer.train_collator is not trainer.data_collator
    assert trainer.get_train_dataloader().collate_fn is trainer.train_collator


@pytest.fixture
def eager_dynamo(monkeypatch):
    """nn.Module.compile with dynamo's eager backend: dynamo's tracing, guards, recompilations and limits
    without inductor's minutes of code generation; dynamo's caches and settings put back after."""
    import torch._dynamo

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: original(self, **kwargs, backend="eager"))
    torch._dynamo.reset()
    # dynamo's own patch (a monkeypatch undo left recompile_limit deleted for later tests of the process)
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit,
                                    accumulated_recompile_limit=torch._dynamo.config.accumulated_recompile_limit):
        yield
    torch._dynamo.reset()


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow  # about 18 s; the compiled layers' use is in the default tier: test_the_layers_share_the_graphs_the_plan_counts
def test_the_fast_paths_compiled_layers_are_used_on_long_pairs(tiny_qwen, tmp_path, caplog, eager_dynamo):
    """RTE's long pairs fill many 16-token buckets; with dynamic=False each shape (and train/eval mode)
    is one compilation, and past dynamo's recompile limit the layers would quietly run eager.
    fail_on_recompile_limit_hit turns that into an error."""
    import torch._dynamo

    started = graphs_compiled()
    out = tmp_path / "rte"
    rte = ["dataset.subset=rte", "dataset.text_column=null", "training.metric_for_best_model=accuracy",
           "training.fast_path=true", "training.report_to=none"]
    with caplog.at_level("WARNING", logger="gluetune"), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        summary = train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, train=160, evals=32) + rte)).metrics
    assert summary["train"]["steps"] == 5
    assert "rehearsal before training failed" not in caplog.text  # the layers would run eager
    assert graphs_compiled() - started > 8  # past dynamo's default recompile_limit


def test_the_layers_share_the_graphs_the_plan_counts(tiny_qwen_4_layers, tmp_path, monkeypatch, caplog, eager_dynamo):
    """One graph per shape and mode, shared by every layer (one code object), as the plan counts them:
    one per training shape (the first layer's input requires grad as the later layers' do: dynamo guards
    on it, and the first layer made graphs of its own before) and one per evaluation shape; the steps, evaluations and
    final predictions after the rehearsal add none. Counted on 4 layers, where a per-layer graph shows:
    dynamo specialises on the int attributes a traced forward reads, and a KV cache's update reads
    `layer_idx`, so a model that runs with its cache on (here `training.use_cache`, which the Trainer
    copies into the model's config) made a graph per layer, 28 per shape for Qwen2.5-1.5B, past the
    limits. Under bf16 mixed precision (forced on: a CPU without AVX512-BF16 would run fp32) the rehearsal
    runs in the autocast accelerate gives the steps (dynamo guards on the autocast state too)."""
    from gluetune.training import training_args

    monkeypatch.setattr(training_args, "native_bf16", lambda: True)
    started, plans, after_rehearsal = graphs_compiled(), [], []
    real_rehearse = fastpath.rehearse

    def rehearse(trainer, train_batches, eval_batches, layers):
        plans.append(len(train_batches) + len(eval_batches))
        compiled = real_rehearse(trainer, train_batches, eval_batches, layers)
        after_rehearsal.append((compiled, graphs_compiled() - started))
        return compiled

    monkeypatch.setattr(fastpath, "rehearse", rehearse)
    overrides = tiny_overrides(tiny_qwen_4_layers, tmp_path / "run", train=64, evals=32, fp32=False) + [
        "training.fast_path=true", "training.report_to=none", "training.use_cache=true"]
    with caplog.at_level("WARNING", logger="gluetune"):
        outcome = train(load_config(REFERENCE_CONFIG, overrides))
    summary = outcome.metrics
    assert summary["precision"] == "bf16" and summary["train"]["steps"] == 2
    assert caplog.text.count("fast path: the model's KV cache off (training.use_cache asked for it)") == 1
    assert after_rehearsal == [(True, plans[0])], caplog.text  # the rehearsal compiled the plan's graphs
    assert graphs_compiled() - started == plans[0]  # and training, evaluation and predictions none more
    # the model the run returns is eager again, its input embeddings without the hook: as a folder loads it
    assert all(m._compiled_call_impl is None for m in outcome.model.modules())
    assert not outcome.model.get_input_embeddings()._forward_hooks


def _cola_with_bucket_long_sentences(root, exact: int, short: int):
    """A CoLA folder whose training sentences are `exact` of exactly 16 tokens (one bucket: a full batch of
    them has no padding) and `short` of 10 (the Qwen2.5 tokenizer: "The" and each " cat" are one token)."""
    folder = root / "CoLA"
    folder.mkdir(parents=True)
    sentence = lambda tokens: "The" + " cat" * (tokens - 1)
    train = [sentence(10)] * short + [sentence(16)] * exact
    (folder / "train.tsv").write_text("".join(f"src\t{i % 2}\t\t{text}\n" for i, text in enumerate(train)))
    (folder / "dev.tsv").write_text("".join(f"src\t{i % 2}\t\t{sentence(12 + i % 5)}\n" for i in range(32)))
    return root


@pytest.mark.parametrize(("exact", "short"), [(80, 0), (56, 24)])
def test_a_batch_without_padding_is_planned_and_nothing_compiles_mid_run(exact, short, tiny_qwen, tmp_path, monkeypatch,
                                                                         eager_dynamo):
    """A full micro-batch of sentences exactly a bucket long has no padding; the model then drops its
    all-ones attention mask (Qwen2 with SDPA passes None to its layers) and the layers make another graph.
    The plan holds it: the rehearsal runs such a batch beside a padded one of the same width, and the
    steps after it compile nothing (they compiled one graph more, mid-run, before: the CPU default hit
    dynamo's limit that way and ran its layers eagerly from then on). With every sentence that long, the
    padded batch is the short last one (its filler rows are padding); with both lengths, a full batch of
    the long ones is the batch without padding."""
    started, plans, rehearsed = graphs_compiled(), [], []
    real_rehearse = fastpath.rehearse

    def rehearse(trainer, train_batches, eval_batches, layers):
        plans.append(len(train_batches) + len(eval_batches))
        rehearsed.extend(train_batches)
        return real_rehearse(trainer, train_batches, eval_batches, layers)

    monkeypatch.setattr(fastpath, "rehearse", rehearse)
    glue = _cola_with_bucket_long_sentences(tmp_path / "glue", exact=exact, short=short)
    overrides = tiny_overrides(tiny_qwen, tmp_path / "run", train=80, evals=32) + [
        f"dataset.data_dir={glue}", "training.fast_path=true", "training.report_to=none"]
    summary = train(load_config(REFERENCE_CONFIG, overrides)).metrics
    assert summary["train"]["steps"] == 3
    masks = [bool(b["attention_mask"].all()) for b in rehearsed if b["input_ids"].shape == (32, 16)]
    assert masks == [False, True]  # one batch with padding (first: a CUDA graph is captured from it), one without
    assert graphs_compiled() - started == plans[0]  # training and evaluation compiled none beyond the plan


def test_dynamos_two_limits_hold_the_plan_for_the_run_only(tiny_qwen, tmp_path, caplog, eager_dynamo):
    """dynamo stops compiling a code object past `recompile_limit` (cache entries, 8 by default) or
    `accumulated_recompile_limit` (compilations, 256), and from then on runs it eagerly without a word.
    The fast path raises both to what its plan compiles, for the run only, and says so in one line.
    Both are 1 here (fail_on_recompile_limit_hit makes a hit the rehearsal's failure): one bucket
    (max_length 16) and evaluation in batches of 32 with a short last one make 3 graphs."""
    import torch._dynamo

    overrides = tiny_overrides(tiny_qwen, tmp_path / "run", train=64, evals=48) + [
        "training.fast_path=true", "training.report_to=none", "dataset.max_length=16",
        "training.per_device_eval_batch_size=32"]
    started = graphs_compiled()
    limits = torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1, fail_on_recompile_limit_hit=True)
    with caplog.at_level("INFO", logger="gluetune"), limits:
        train(load_config(REFERENCE_CONFIG, overrides))
        after = torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit
    assert "rehearsal before training failed" not in caplog.text
    assert graphs_compiled() - started == 3  # 1 in training, one per evaluation batch shape
    assert after == (1, 1)  # put back when the run ended
    said = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], said
    assert "recompile_limit 1" in said[0] and "accumulated_recompile_limit 1" in said[0], said
