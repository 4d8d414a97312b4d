"""`lightning-unlearn demo`: the whole pipeline on the embedded default, offline, on a laptop-class CPU.

Builds the synthetic corpus with canaries, trains a small GPT-2-shaped model, retrains it without the forget
set (the gold standard), unlearns with the default method (K-FAC Newton), evaluates every metric before, after
and for the retrained model, and writes the report (json, md, png) and the unlearned model (safetensors).
The output directory appears only when the run succeeds (it is built in a temporary sibling and renamed).

Output: `report.json`, `report.md`, PNG plots, `model/` (unlearned), `original/` and `retrained/` (with the
tokenizer), `data/train.jsonl` (the training text with its canaries, for `configs/unlearn_*.yaml`),
`data/holdout.jsonl` (never-inserted canaries labelled on their secret: the configs' `data.holdout`, the target
this run calibrates on), `data/references.jsonl` (the evaluation's never-inserted canaries), `data/canaries.json`
(the canary registry: it holds the secrets, for evaluation only; never logged) and `run.json` (status, steps
accepted, exit status, start and end). The output is checked before any work (`check_output`: an
existing non-empty folder needs `overwrite`, an empty one is fine); an earlier demo output there says
`finished: false` in its `run.json` until the new one replaces it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import EXIT_NOTHING_ACCEPTED
from .experiment import Experiment, ExperimentConfig, summarize
from .io import RunRecord, atomic_directory, check_output, write_manifest
from .models import atomic_save_pretrained
from .settings import UnlearnSettings

#: the demo's unlearning run: `UnlearnSettings`' defaults (the method's default recipe: no damping, scale, steps or
#: forget loss set; the target calibrated on the experiment's holdout data, never-inserted canaries) with 8 curvature
#: batches, which the demo's 1M-parameter model needs no more than (and which keep it a laptop-sized run)
DEFAULT_SETTINGS = UnlearnSettings(curvature_batches=8)


def run_demo(output: str | Path = "runs/demo", *, config: ExperimentConfig | None = None,
             settings: UnlearnSettings | None = None, progress: bool = True, overwrite: bool = False,
             cache: str | Path | None = None, protected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the demo into `output` and return the report's headline (`summary`).

    `cache`: a folder whose trained models are reused across runs (default: inside the run's temporary folder,
    so every demo trains from scratch). `protected`: paths `output` must not be nor contain (the cache is one);
    a refused output raises `UserInputError` before any work (see `lightning_unlearn.io.check_output`).
    """
    output = check_output(output, overwrite, {"--cache": cache, **(protected or {})})
    config = config or ExperimentConfig()
    settings = settings or DEFAULT_SETTINGS
    record = RunRecord("demo", output)
    record.start()
    try:
        with atomic_directory(output) as work:
            summary = _run(work, config, settings, progress, Path(cache) if cache else None)
            shutil.rmtree(work / "cache", ignore_errors=True)
            record.status = summary.get("status")
            record.steps_accepted = (summary.get("unlearning") or {}).get("steps_accepted")
            record.exit_code = EXIT_NOTHING_ACCEPTED if record.status == "nothing_accepted" else 0
            write_manifest(work, **record.fields(finished=True))
    except BaseException as err:  # the older output stays, marked as not this run's
        record.abort(err, interrupted=not isinstance(err, Exception))
        raise
    return summary


def _run(work: Path, config: ExperimentConfig, settings: UnlearnSettings, progress: bool,
         cache: Path | None) -> dict[str, Any]:
    from .report import hash_state_dict, write_report

    start = time.perf_counter()
    quiet_libraries()
    exp = Experiment(config, cache if cache is not None else work, progress=progress)
    _say(progress, f"building the corpus ({config.corpus_bytes / 1e6:.1f} MB) and the tokenizer")
    data = exp.data
    _say(progress, f"training the original model ({config.train_steps} steps)")
    original = exp.train("full")
    _say(progress, "retraining without the forget set (the gold standard)")
    retrained = exp.train("retain")
    _say(progress, "evaluating the original and the retrained model")
    before = exp.evaluate(original)
    retrain = exp.evaluate(retrained)
    _say(progress, f"unlearning: {settings.method} with {settings.curvature} curvature")
    unlearned, history, unlearn_seconds = exp.unlearn(original, settings)
    run = dict(getattr(exp, "last_summary", None) or {})  # the method's summary(): status, target, losses
    _say(progress, "evaluating the unlearned model")
    after = exp.evaluate(unlearned, reference=retrained)
    atomic_save_pretrained(unlearned, work / "model", tokenizer=data.tokenizer)
    # what a LightningCLI run (configs/unlearn_*.yaml) needs to unlearn the same model again, another way
    atomic_save_pretrained(original, work / "original", tokenizer=data.tokenizer)
    atomic_save_pretrained(retrained, work / "retrained", tokenizer=data.tokenizer)
    (work / "data").mkdir(exist_ok=True)
    exp.train_dataset.to_json(str(work / "data" / "train.jsonl"), lines=True)
    # never-inserted canaries labelled on their secret (a `spans` column), the forget set's kind: the holdout the
    # unlearning target is calibrated on (`data.holdout` of the configs: the same target as this run's), and the
    # evaluation's references (membership inference against them, as in the report)
    write_canaries(exp.calibration_canaries, work / "data" / "holdout.jsonl")
    write_canaries(exp.registry.references, work / "data" / "references.jsonl")
    exp.registry.save(work / "data" / "canaries.json")
    registry = exp.registry
    secrets = [c.secret for c in registry.inserted + registry.references]
    secrets += [c.text for c in registry.inserted + registry.references]
    timing = {"train_seconds": exp.timings["train_seconds"], "retrain_seconds": exp.timings["retrain_seconds"],
              "unlearn_seconds": unlearn_seconds, "total_seconds": time.perf_counter() - start}
    summary = {
        "curvature": settings.curvature if settings.second_order else None,
        "before": summarize(before), "after": summarize(after), "retrain": summarize(retrain),
        "timing": timing,
        "steps": [r.to_dict() for r in history],
        # how the run ended and what it aimed at (see `Unlearner.summary`)
        "status": run.get("status"), "target": run.get("target"), "target_source": run.get("target_source"),
        "unlearning": run,
    }
    write_report(work, after=after, before=before, reference=retrain, method=settings.method,
                 hyperparameters={"unlearning": settings.to_dict(), "experiment": dataclasses.asdict(config)},
                 timings=timing, seed=config.seed, forget_sha256=_forget_sha256(data),
                 weights_before_sha256=hash_state_dict(original), weights_after_sha256=hash_state_dict(unlearned),
                 secrets=secrets, summary={**summary, "method_settings": settings.to_dict()})
    summary["method"] = settings.method
    return summary


def write_canaries(canaries: list[Any], path: Path) -> Path:
    """Canaries as JSON lines `{"text", "spans": [[start, end]] of the secret, "canary_id"}`: a data source for
    `ForgetRetainDataModule(holdout=..., span="offsets")`."""
    import json

    rows = [{"text": c.text, "spans": [list(c.secret_span)], "canary_id": c.id} for c in canaries]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def quiet_libraries() -> None:
    """Keep the terminal to our own progress: no per-map bars from datasets, no load reports from transformers."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for pattern in (".*does not have many workers.*", ".*modules? in eval mode.*", ".*LeafSpec.*",
                    ".*no `val_dataloader`.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging_names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
    import logging

    for name in logging_names:
        logging.getLogger(name).setLevel(logging.WARNING)


def _forget_sha256(data: Any) -> str:
    import hashlib

    digests = sorted(data.forget_sha256)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]▶[/] {message}")


def summary_table(summary: dict[str, Any]) -> Any:
    """A rich Table of the headline numbers (before / after / retrained) and the timings."""
    from rich.table import Table

    table = Table(title=f"lightning-unlearn demo: {summary.get('method')} ({summary.get('curvature')})")
    table.add_column("metric")
    for col in ("before", "after", "retrain"):
        table.add_column(col, justify="right")
    for key in summary["before"]:
        table.add_row(key, *(f"{summary[c][key]:.3f}" for c in ("before", "after", "retrain")))
    if summary.get("status") is not None:
        target = summary.get("target")
        table.caption = (f"status {summary['status']} · target {'–' if target is None else f'{target:.3g}'}"
                         f" ({summary.get('target_source')})")
    return table


def timing_line(summary: dict[str, Any]) -> str:
    """One line of the run's timings."""
    t = summary["timing"]
    return (f"train {t['train_seconds']:.0f} s · retrain {t['retrain_seconds']:.0f} s · "
            f"unlearn {t['unlearn_seconds']:.1f} s · total {t['total_seconds']:.0f} s")
