"""The bad-input catalogue, continued (`tests/test_bad_inputs_*.py` have the rest): strategies named on the command
line, output folders that must never be lost (several configs, a folder that appears during the run, two runs into
one output, a full disk), forget selections that no message may echo, curvature checkpoints that are wrong in ways
their shapes do not show, and failures that must read as one clear line.

Every case runs the real command (or the real API) on a tiny saved model and real files, and the autouse check
asserts afterwards that each project's source model and training data are byte-identical.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from bad_input_fixtures import (
    ENDLESS,
    FORGET_IDS,
    NOTHING_ACCEPTED,
    error_line,
    make_project,
    run_cli,
    user_files_untouched,  # noqa: F401 - the autouse check of every case
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_unlearn.errors import EXIT_NOTHING_ACCEPTED, UserInputError


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("user"))


def fit(project, *args: str, config: Path | None = None) -> tuple[int, str, str]:
    return run_cli(["fit", "--config", str(config or project.config), *args], project.root)


def subprocess_env(project, logs: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "LIGHTNING_UNLEARN_LOG_DIR": str(project.root / logs)}


# ======================================================================================================================
# Strategies named on the command line
# ======================================================================================================================


@pytest.mark.parametrize("name", ["ModelParallelStrategy", "lightning.pytorch.strategies.ModelParallelStrategy"])
def test_a_strategy_class_named_without_arguments_gets_the_class_path_form(project, name):
    code, out, err = fit(project, "--trainer.strategy", name, "--output", str(project.root / "mp"))
    error_line(code, err, "trainer.strategy", "class name",
               "--trainer.strategy.class_path lightning.pytorch.strategies.ModelParallelStrategy",
               "--trainer.strategy.init_args.tensor_parallel_size 1")
    assert "unlearning status" not in out and not (project.root / "mp").exists()


def test_the_class_path_form_of_the_message_runs(project, tmp_path):
    """The fix the message gives works: the same run with the class_path form (one process, FSDP2 of size 1)."""
    import torch.distributed as dist

    output = tmp_path / "mp"
    try:
        code, out, err = fit(project, "--trainer.strategy.class_path",
                             "lightning.pytorch.strategies.ModelParallelStrategy",
                             "--trainer.strategy.init_args.data_parallel_size", "1",
                             "--trainer.strategy.init_args.tensor_parallel_size", "1", "--output", str(output))
    finally:  # the in-process run joined a process group of one: leave it, or later metrics would try to sync
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    assert code in (0, EXIT_NOTHING_ACCEPTED), err[-3000:]
    assert "unlearning status" in out


@pytest.mark.parametrize(("value", "named"), [("fsdp", "'fsdp' (FSDPStrategy) is not supported"),
                                              ("FSDPStrategy", "'FSDPStrategy' is not supported"),
                                              ("deepspeed_stage_3", "(DeepSpeedStrategy) is not supported")])
def test_fsdp1_and_deepspeed_by_name_are_refused_naming_model_parallel_even_on_cpu(project, value, named):
    """On CPU Lightning would refuse `fsdp` first ("requires a GPU accelerator"), never naming what works."""
    code, _, err = fit(project, "--trainer.strategy", value)
    error_line(code, err, named, "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)",
               "--trainer.strategy ddp")
    assert "requires a GPU" not in err and not project.output.exists()


def test_an_unknown_strategy_name_lists_the_choices(project):
    code, _, err = fit(project, "--trainer.strategy", "ddp_spwn")
    error_line(code, err, "unknown strategy 'ddp_spwn'", "ddp_spawn", "class_path")


def test_a_trainer_setting_lightning_refuses_is_one_line(project):
    if torch.cuda.is_available():
        pytest.skip("the accelerator exists here")
    code, _, err = fit(project, "--trainer.accelerator", "cuda")
    error_line(code, err, "the trainer settings:", "CUDAAccelerator", "not available")


# ======================================================================================================================
# Output folders: never lost
# ======================================================================================================================


def test_every_config_file_is_protected_not_only_the_last(project, tmp_path):
    folder = tmp_path / "experiment"
    folder.mkdir()
    first = folder / "base.yaml"
    first.write_text(project.config.read_text())
    (folder / "notes.md").write_text("the user's notes")
    second = project.write_config("override.yaml", **{"model.damping": 0.01})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = run_cli(["fit", "--config", str(first), "--config", str(second), "--output", str(folder),
                              "--overwrite"], project.root)
    error_line(code, err, "contains config file 1 of 2", str(first), "even with --overwrite")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


class CreateOutputAtStart(L.Callback):
    """Another program writes into the output folder while the run is under way (at the start of the fit)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module) -> None:
        Path(self.folder).mkdir(parents=True)
        (Path(self.folder) / "results.csv").write_text("written by another program\n")


def appearing(folder: Path) -> list[str]:
    return ["--trainer.callbacks+=" + f"{__name__}.CreateOutputAtStart",
            "--trainer.callbacks.init_args.folder", str(folder)]


def test_an_output_that_appears_during_the_run_is_kept_and_the_model_saved_beside_it(project, tmp_path):
    output = tmp_path / "fresh"
    code, out, err = fit(project, "--output", str(output), *appearing(output))
    line = error_line(code, err, str(output), "appeared during the run", "--overwrite")
    assert (output / "results.csv").read_text() == "written by another program\n"
    assert sorted(p.name for p in output.iterdir()) == ["results.csv"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("fresh.new-")]
    assert len(kept) == 1 and str(kept[0]) in line and (kept[0] / "model.safetensors").is_file()
    assert "unlearned model written" not in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_with_overwrite_an_output_that_appeared_is_replaced_and_the_run_says_so(project, tmp_path):
    output = tmp_path / "fresh"
    code, out, err = fit(project, "--output", str(output), "--overwrite", *appearing(output))
    assert code == 0, err[-3000:]
    assert (output / "model.safetensors").is_file() and not (output / "results.csv").exists()
    assert "appeared during the run" in out and "replaced by this run's model because --overwrite" in out


def test_two_runs_into_one_output_cannot_both_succeed(project, tmp_path):
    """A real second process holds the output (a run that goes on until it is stopped); the run started second is
    refused at its start, naming the other process, and the first one's output is left to it."""
    from lightning_unlearn.io import _claim_key, _lock_file

    output = tmp_path / "shared"
    cmd = [sys.executable, "-m", "lightning_unlearn.cli", "fit", "--config", str(project.config), "--output",
           str(output), *ENDLESS]
    # wandb disabled in the holder: the lock is what is tested here, and wandb's own teardown after a signal (its
    # service flushing an offline run) has been seen to take minutes on a loaded machine; the SIGTERM path with
    # wandb on is test_bad_inputs_signals.py's
    env = {**subprocess_env(project, "first_logs"), "WANDB_MODE": "disabled"}
    first = subprocess.Popen(cmd, cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = _lock_file(_claim_key(output))
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline:
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-3000:]
        code, out, err = fit(project, "--output", str(output))
        error_line(code, err, str(output), "is being written by another run", f"process {first.pid}")
        assert "unlearning status" not in out
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
    assert not lock.exists(), "the lock file outlived the run"
    code, _, err = fit(project, "--output", str(output), "--trainer.max_steps", "1")  # the lock is gone with it
    assert code in (0, EXIT_NOTHING_ACCEPTED), err[-3000:]


def test_a_full_disk_at_save_time_is_one_line_and_leaves_nothing(project, tmp_path):
    """A real write failure: the run's file size limit (RLIMIT_FSIZE, what a full disk does to a write: the
    model file cannot be written) in a real process."""
    output = tmp_path / "full"
    model_size = (project.model / "model.safetensors").stat().st_size

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (model_size // 2, model_size // 2))

    cmd = [sys.executable, "-m", "lightning_unlearn.cli", "fit", "--config", str(project.config), "--output",
           str(output)]
    proc = subprocess.run(cmd, cwd=project.root, env=subprocess_env(project, "full_logs"), capture_output=True,
                          text=True, preexec_fn=limit, timeout=600)
    line = error_line(proc.returncode, proc.stderr, "cannot write", str(output), "the disk is full or a size limit",
                      "free some space")
    assert "File too large" in line
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a half-written folder was left"


# ======================================================================================================================
# Forget selections: no message echoes them, whatever their length or source
# ======================================================================================================================


@pytest.mark.parametrize(("key", "value", "given"), [
    ("data.forget_regex", ["SECRETPHONE-555-0199"], "got a list"),
    ("data.forget_ids", {"doc-10": True, "doc-17": True}, "got a dict"),
    ("data.forget_ids", "17", "got a str"),
])
def test_a_forget_selection_of_the_wrong_type_in_a_config_file_is_not_echoed(project, key, value, given):
    other = "data.forget_ids" if key == "data.forget_regex" else "data.forget_regex"
    config = project.write_config(f"bad_{key}.yaml", **{key: value, other: None})
    code, out, err = fit(project, config=config)
    line = error_line(code, err, key, given, "the value is not shown")
    for secret in ("SECRETPHONE", "555-0199", "doc-10", "doc-17"):
        assert secret not in out + err, line
    assert "17" not in line and "555" not in line  # short values: the error line (wandb's run names hold digits)
    assert not project.output.exists()


@pytest.mark.parametrize("value", ["7", "42", '"17"'])
def test_a_short_forget_value_on_the_command_line_is_not_echoed(project, value):
    code, out, err = fit(project, "--data.forget_ids", value)
    line = error_line(code, err, "data.forget_ids", "the value is not shown")
    assert value.strip('"') not in line, line


def test_a_whole_data_section_on_the_command_line_is_not_echoed(project):
    """`--data '{...}'` with a bad batch size: jsonargparse quotes the whole section, forget ids included."""
    data = json.dumps({"forget_ids": ["SECRETDOC-9"], "batch_size": "x", "train": str(project.data),
                       "id_column": "id", "tokenizer": str(project.model)})
    code, out, err = fit(project, "--data", data)
    error_line(code, err, "data.batch_size", "not shown")
    assert "SECRETDOC" not in out + err


def test_a_string_of_forget_ids_is_refused_not_read_character_by_character(project):
    """forget_ids='17' selected rows 1 and 7 (the characters) and kept row 17."""
    from lightning_unlearn.data import ForgetRetainDataModule

    with pytest.raises(UserInputError, match=r"forget_ids must be a list of ids, got a str .*forget_ids=\['id-a'\]") \
            as raised:
        ForgetRetainDataModule(train=str(project.data), forget_ids="17", tokenizer=str(project.model))
    assert "17" not in str(raised.value)
    data = ForgetRetainDataModule(train=str(project.data), forget_ids=["17"], tokenizer=str(project.model),
                                  max_length=64)
    data.setup()
    assert data.forget_example_ids == [17]  # one id in a list: that row only


def logged_files_holding(root: Path, secret: str) -> list[str]:
    """The files under `root` (the run's logs and outputs) whose bytes hold `secret`."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("value", ['["record 3: my code is SECRETTXT-4471", 5]', "SECRETTXT4471"])
def test_a_forget_text_given_as_one_string_is_not_sent_to_the_hub_nor_echoed(project, tmp_path, value):
    """`--data.forget '["a text", 5]'` is read by jsonargparse as one string, which was resolved as a hub dataset
    name: the text went into an HTTP URL, a log line and a traceback. Refused before any network access, one line."""
    code, out, err = fit(project, "--data.forget_ids", "null", "--data.id_column", "null", "--data.forget", value,
                         "--output", str(tmp_path / "out"))
    error_line(code, err, "forget: the given string is not an existing file or folder", "the value is not shown",
               "a list of texts")
    assert "SECRETTXT" not in out + err and "4471" not in err
    assert not logged_files_holding(project.root / "logs", "SECRETTXT")
    assert not (tmp_path / "out").exists()


def test_a_forget_list_of_the_wrong_type_is_not_echoed(project, tmp_path):
    """A YAML list of forget texts with a number in it: jsonargparse's error quoted the whole list."""
    config = project.write_config("forget_list_bad.yaml", **{"data.forget": ["record 3: SECRETTXT-88", 5],
                                                             "data.forget_ids": None, "data.id_column": None,
                                                             "output": str(tmp_path / "out")})
    code, out, err = fit(project, config=config)
    error_line(code, err, "data.forget: expected the path of a file or folder, a list of texts (strings only)",
               "got a list", "the value is not shown")
    assert "SECRETTXT" not in out + err


def test_forget_texts_in_a_config_are_redacted_where_it_is_saved(project, tmp_path):
    """`data.forget: [texts]` was saved verbatim in logs/.../config.yaml; it is replaced by a count."""
    import yaml

    rows = [json.loads(line) for line in project.data.read_text().splitlines()]
    forget = [r["text"] for r in rows if r["id"] in FORGET_IDS]
    config = project.write_config("forget_texts.yaml", **{"data.forget": forget, "data.forget_ids": None,
                                                          "data.id_column": None, "output": str(tmp_path / "out")})
    start = time.time()
    code, out, err = fit(project, config=config)
    assert code == 0, err[-3000:]
    saved = [p for p in (project.root / "logs").rglob("config.yaml") if p.stat().st_mtime >= start]  # this run's
    assert saved and all(yaml.safe_load(p.read_text())["data"]["forget"] in (["<3 texts redacted>"],
                                                                             "['<3 texts redacted>']") for p in saved)
    for text in forget:
        assert not logged_files_holding(project.root / "logs", text), text


def test_text_sources_are_redacted_and_masked():
    """The saved config keeps no forget or holdout text (paths stay), and a message that quotes a text given on the
    command line is masked."""
    from jsonargparse import Namespace

    from lightning_unlearn.cli.config import redact_forget_selection
    from lightning_unlearn.cli.user_errors import user_error

    config = Namespace(data=Namespace(forget=["SECRET one", "SECRET two"], holdout="a SECRET text",
                                      retain=__file__, forget_ids=None, forget_regex=None))
    redacted = redact_forget_selection(config)
    assert redacted.data.forget == ["<2 texts redacted>"]
    assert redacted.data.holdout == "<redacted: not an existing path>"
    assert redacted.data.retain == __file__ and config.data.forget == ["SECRET one", "SECRET two"]
    args = ["fit", "--data.forget", '["the SECRET-77 text", "another SECRET-88"]', "--data.holdout=held SECRET-99",
            "--data.retain", __file__]
    line = user_error(UserInputError(f"bad: 'the SECRET-77 text' and another SECRET-88 and held SECRET-99 in "
                                     f"{__file__}"), args)
    assert "SECRET" not in line and __file__ in line and line.startswith("bad: ")


# ======================================================================================================================
# Curvature checkpoints that their shapes do not give away
# ======================================================================================================================


def curvature_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 40, (4, 32), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.fixture(scope="module")
def ckpt(project, tmp_path_factory):
    """(model, a good K-FAC checkpoint of it, the folder for edited copies)."""
    from lightning_unlearn.checkpoint import save_curvature
    from lightning_unlearn.methods import build_curvature
    from lightning_unlearn.models import load_causal_lm

    folder = tmp_path_factory.mktemp("checkpoints")
    model = load_causal_lm(project.model)
    path = save_curvature(build_curvature("kfac", model).fit(curvature_batches()), folder / "good.safetensors")
    return model, path, folder


def edited(source: Path, target: Path, tensors=None, header=None) -> Path:
    """A copy of checkpoint `source` with its tensors and/or header changed in place by the given functions."""
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
    table = load_file(str(source))
    if tensors:
        tensors(table)
    if header:
        header(meta)
    save_file(table, str(target), metadata=meta)
    return target


def refused(path: Path, model, *fragments: str, **kwargs) -> str:
    from lightning_unlearn.checkpoint import load_curvature_state

    with pytest.raises(UserInputError) as raised:
        load_curvature_state(path, model=model, backend="kfac", **kwargs)
    message = str(raised.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def factor_keys(table, suffix: str) -> list[str]:
    return [k for k in table if k.endswith(suffix)]


def test_a_checkpoint_of_another_model_with_the_same_shapes_is_refused_naming_the_override(ckpt, tmp_path):
    from lightning_unlearn.checkpoint import load_curvature_state, save_curvature
    from lightning_unlearn.methods import build_curvature
    from lightning_unlearn.models import load_causal_lm

    model, good, _ = ckpt
    other = load_causal_lm(make_project(tmp_path / "other").model)  # same architecture, its own initialisation
    path = save_curvature(build_curvature("kfac", other).fit(curvature_batches()), tmp_path / "other.safetensors")
    refused(path, model, "was computed on other weights", "same shapes but other values", "check_weights=False")
    assert load_curvature_state(path, model=model, backend="kfac", check_weights=False)["backend"] == "kfac"
    assert load_curvature_state(good, model=model.to(torch.bfloat16), backend="kfac")  # same weights in bf16: fine
    model.float()


def test_a_checkpoint_of_another_model_is_refused_through_the_command(project, ckpt, tmp_path):
    from lightning_unlearn.checkpoint import save_curvature
    from lightning_unlearn.methods import build_curvature
    from lightning_unlearn.models import load_causal_lm

    other = load_causal_lm(make_project(tmp_path / "other").model)
    path = save_curvature(build_curvature("kfac", other).fit(curvature_batches()), tmp_path / "other.safetensors")
    code, out, err = fit(project, "--model.curvature_data", "full_minus_forget", "--model.full_curvature", str(path))
    error_line(code, err, str(path), "computed on other weights")
    assert not project.output.exists()


def test_a_zeroed_fingerprint_is_refused(ckpt):
    model, good, folder = ckpt
    path = edited(good, folder / "zeroed.safetensors", header=lambda m: m.update(model_fingerprint="0" * 64))
    refused(path, model, "model fingerprint does not match this model's")


def test_negated_factors_are_refused_as_negative_curvature(ckpt):
    """A negated pair of K-FAC factors (A -> -A, G -> -G) has the same Kronecker product: only their signs tell."""
    model, good, folder = ckpt

    def negate(table):
        for key in factor_keys(table, "/A") + factor_keys(table, "/G"):
            table[key] = -table[key]

    refused(edited(good, folder / "negated.safetensors", tensors=negate), model, "has negative curvature",
            "positive semi-definite")


def test_an_integer_factor_is_refused(ckpt):
    model, good, folder = ckpt

    def integer(table):
        key = factor_keys(table, "/A")[0]
        table[key] = table[key].round().long()

    refused(edited(good, folder / "int64.safetensors", tensors=integer), model, "holds int64 values",
            "floating-point")


def test_one_ranks_share_is_refused_on_one_process_without_being_told_the_world_size(ckpt):
    """`load_curvature_state` without world_size (as the request path calls it): the process group's, 1 here."""
    model, good, folder = ckpt
    path = edited(good, folder / "rank.safetensors", header=lambda m: m.update(scope="rank", world_size="2"))
    refused(path, model, "one process's share of a run with world size 2, but this run has 1 processes")


@pytest.mark.parametrize("size", [40, 20])
def test_a_factor_of_the_wrong_size_names_the_layer_and_the_size(ckpt, size):
    model, good, folder = ckpt

    def resize(table):
        table[factor_keys(table, "/A")[0]] = torch.eye(size)

    message = refused(edited(good, folder / f"size{size}.safetensors", tensors=resize), model,
                      f"has shape ({size}, {size})", "needs (33, 33)", "33 inputs with the bias, 96 outputs")
    assert "wide_layer" not in message and "size of tensor" not in message


def test_a_checkpoint_whose_header_lies_about_its_shapes_is_refused_without_wide_layer_advice(ckpt, tmp_path):
    """A wider model's checkpoint whose header claims this model's shapes, fingerprint and weights."""
    from lightning_unlearn.checkpoint import save_curvature
    from lightning_unlearn.methods import build_curvature
    from lightning_unlearn.models import load_causal_lm

    model, good, _ = ckpt
    wide = load_causal_lm(make_project(tmp_path / "wide", hidden=64).model)
    path = save_curvature(build_curvature("kfac", wide).fit(curvature_batches()), tmp_path / "wide.safetensors")
    with safe_open(str(good), framework="pt") as f:
        claims = {k: f.metadata()[k] for k in ("param_shapes", "model_fingerprint", "weights_sample")}
    lying = edited(path, tmp_path / "lying.safetensors", header=lambda m: m.update(claims))
    message = refused(lying, model, "has shape (65, 65)", "needs (33, 33)", "do not match its tensors")
    assert "wide_layer" not in message


@pytest.mark.parametrize("state", ["[" * 100_000 + "]" * 100_000, '{"$tuple": ' * 5000 + "[]" + "}" * 5000],
                         ids=["json", "structure"])
def test_a_deeply_nested_header_is_refused(ckpt, state):
    model, good, folder = ckpt
    message = refused(edited(good, folder / "deep.safetensors", header=lambda m: m.update(state=state)), model,
                      "nested too deeply")
    assert "RecursionError" not in message


def test_a_legacy_file_missing_entries_names_them(ckpt):
    from lightning_unlearn.checkpoint import LEGACY_CURVATURE_FILE_FORMAT, load_curvature_state

    model, good, folder = ckpt
    state = load_curvature_state(good)
    del state["kfac_approx"], state["fisher_type"]
    path = folder / "legacy.pt"
    torch.save({"format": LEGACY_CURVATURE_FILE_FORMAT, "state": state, "meta": {}}, path)
    refused(path, model, "lacks 'fisher_type', 'kfac_approx' of a 'kfac' curvature state")


# ======================================================================================================================
# Data: batch sizes, tokenizers, positions, forget texts outside the training data
# ======================================================================================================================


def test_batch_size_zero_for_a_loader_is_refused_not_replaced_by_the_default(project):
    from lightning_unlearn.data import ForgetRetainDataModule

    data = ForgetRetainDataModule(train=str(project.data), forget_ids=FORGET_IDS, id_column="id",
                                  tokenizer=str(project.model), max_length=64)
    with pytest.raises(UserInputError, match="batch_size=0 for the retain loader; give a positive integer"):
        data.dataloader("retain", batch_size=0)
    with pytest.raises(UserInputError, match="batch_size=0 for the retain loader"):
        data.curvature_dataloader("retain", batch_size=0)
    assert data.dataloader("retain", batch_size=3).batch_size == 3


def permuted_tokenizer(project, folder: Path) -> Path:
    """The project's tokenizer with its tokens in the reverse order: the same size, every id another token."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    saved = AutoTokenizer.from_pretrained(project.model)
    chars = [t for t, _ in sorted(saved.get_vocab().items(), key=lambda item: item[1])][::-1]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)},
                                                                        merges=[])))
    tok.pad_token = "."
    tok.save_pretrained(folder)
    return folder


def test_a_tokenizer_of_the_same_size_that_is_not_the_models_is_refused(project, tmp_path):
    other = permuted_tokenizer(project, tmp_path / "other_tokenizer")
    code, out, err = fit(project, "--data.tokenizer", str(other))
    error_line(code, err, "not the one saved with the model", "both have 44 tokens",
               f"data.tokenizer: '{project.model}'")
    assert "unlearning status" not in out and not project.output.exists()


def long_texts_project(root: Path):
    """A project whose training texts are about 100 tokens long (the model has 64 positions)."""
    project = make_project(root)
    rows = [json.loads(line) for line in project.data.read_text().splitlines()]
    longer = project.root / "long.jsonl"
    longer.write_text("".join(json.dumps({**r, "text": f"{r['text']} {r['text']}"}) + "\n" for r in rows))
    return project, longer


def test_max_length_beyond_the_models_positions_names_both(tmp_path):
    """The realistic 128 on a 64-position model: an IndexError traceback inside the model before."""
    project, longer = long_texts_project(tmp_path)
    code, out, err = fit(project, "--data.train", str(longer), "--data.max_length", "128")
    error_line(code, err, "max_length=128 is more than the model's 64 positions", "set max_length=64")
    assert "IndexError" not in err and not project.output.exists()


def test_max_length_beyond_the_positions_is_fine_when_every_example_fits(project):
    """Short examples never reach the positions the model lacks: not refused (no example is longer than 64)."""
    from lightning_unlearn.data import ForgetRetainDataModule
    from lightning_unlearn.models import load_causal_lm

    data = ForgetRetainDataModule(train=str(project.data), forget_ids=FORGET_IDS, id_column="id",
                                  tokenizer=str(project.model), max_length=128)
    data.setup()
    data.check_model(load_causal_lm(project.model))
    assert data.position_limit == 64
    with pytest.raises(UserInputError, match="max_length=128 is more than the model's 64 positions: retain"):
        packed = ForgetRetainDataModule(train=str(project.data), forget_ids=FORGET_IDS, id_column="id",
                                        tokenizer=str(project.model), max_length=128, packing=True)
        packed.setup()
        packed.check_model(load_causal_lm(project.model))


def test_forget_not_in_train_warn_warns_even_when_no_forget_text_is_a_training_text(project, tmp_path):
    from lightning_unlearn.data import ForgetRetainDataModule

    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps({"text": f"never trained on {i}."}) + "\n" for i in range(3)))
    kwargs = dict(train=str(project.data), forget=str(forget), tokenizer=str(project.model), max_length=64)
    with pytest.raises(UserInputError, match="forget_not_in_train='warn'"):
        ForgetRetainDataModule(**kwargs).setup()
    data = ForgetRetainDataModule(**kwargs, forget_not_in_train="warn")
    with pytest.warns(UserWarning, match="none of the forget examples is a training text"):
        data.setup()
    assert data.forget_example_ids == [-1, -2, -3]


# ======================================================================================================================
# Unclear failures made clear
# ======================================================================================================================


def test_wandb_online_without_a_key_falls_back_to_offline_at_once(project, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    start = time.monotonic()
    code, out, err = fit(project, "--output", str(tmp_path / "out"))
    assert code in (0, EXIT_NOTHING_ACCEPTED), err[-3000:]
    assert "WANDB_MODE=online but no wandb API key" in err and "logging to wandb offline instead" in err
    assert "Traceback" not in err and time.monotonic() - start < 120


def test_wandb_online_with_an_unreachable_server_falls_back_to_offline(project, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    code, out, err = fit(project, "--output", str(tmp_path / "out"))
    assert code in (0, EXIT_NOTHING_ACCEPTED), err[-3000:]
    assert "127.0.0.1 cannot be reached" in err and "logging to wandb offline instead" in err


@pytest.mark.parametrize("kind", ["a dangling link", "a folder"])
def test_an_unreadable_model_file_is_called_unreadable_not_missing(project, tmp_path, kind):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(project.model, model)
    weights = model / "model.safetensors"
    weights.unlink()
    if kind == "a dangling link":
        weights.symlink_to(tmp_path / "blobs" / "gone")
    else:
        weights.mkdir()
    code, out, err = fit(project, "--model.model", str(model))
    line = error_line(code, err, f"'{weights}' cannot be read", "must be readable files")
    assert "does not exist; give a saved model" not in line and not project.output.exists()


def test_validate_after_a_run_that_accepted_nothing_says_the_model_is_an_earlier_one(project, tmp_path):
    import shutil

    from lightning_unlearn.io import write_manifest

    output = tmp_path / "older"
    shutil.copytree(project.model, output)  # an earlier run's output: a model and its run.json
    write_manifest(output, command="fit", status="target_reached", finished=True, exit_code=0, model_written=True)
    code, _, err = fit(project, "--output", str(output), "--overwrite", *NOTHING_ACCEPTED)
    assert code == EXIT_NOTHING_ACCEPTED, err[-3000:]
    code, out, err = run_cli(["validate", "--config", str(project.config), "--output", str(output)], project.root)
    assert code == 0, err[-3000:]
    assert f"evaluating the unlearned model '{output}'" in out
    assert "wrote no model: this model is from an earlier run" in out and "nothing_accepted" in out


# ======================================================================================================================
# Trainer settings that run no unlearning, or that an unlearning step cannot take
# ======================================================================================================================


@pytest.mark.parametrize("args, fragment", [
    (["--trainer.max_steps", "0"], "trainer.max_steps: 0 runs no unlearning step"),
    (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches: 0 runs no unlearning step"),
    (["--trainer.fast_dev_run", "true"], "trainer.fast_dev_run runs a debug step"),
    (["--trainer.gradient_clip_val", "1.0"], "trainer.gradient_clip_val"),
    (["--trainer.accumulate_grad_batches", "4"], "trainer.accumulate_grad_batches"),
    (["--ckpt_path", "nothere.ckpt"], "ckpt_path: 'nothere.ckpt' does not exist"),
])
def test_trainer_settings_that_unlearn_nothing_or_cannot_apply_are_one_line(project, tmp_path, args, fragment):
    code, _, err = fit(project, "--output", str(tmp_path / "out"), *args)
    error_line(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_a_run_in_which_no_step_ran_writes_nothing_and_exits_3(project, tmp_path):
    # an empty forget set and zero steps are refused before the run; a time limit of zero stops it before a step
    config = project.write_config("no_step.yaml", **{"trainer.max_time": "00:00:00:00"})
    code, out, _ = fit(project, "--output", str(tmp_path / "out"), config=config)
    assert code == EXIT_NOTHING_ACCEPTED, out[-2000:]
    assert "no unlearning step ran" in out
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_output_or_log_folder_inside_the_source_model_is_refused(project, tmp_path):
    code, _, err = fit(project, "--output", str(project.model / "unlearned"))
    error_line(code, err, "is inside model.model", "outside it")
    # run from the model's folder: the log folder (LIGHTNING_UNLEARN_LOG_DIR, here ./logs) is inside it
    code, _, err = run_cli(["fit", "--config", str(project.config), "--output", str(tmp_path / "out")], project.model)
    error_line(code, err, "LIGHTNING_UNLEARN_LOG_DIR", "inside the source model's folder")
    assert not (project.model / "logs").exists() and not (project.model / "unlearned").exists()
