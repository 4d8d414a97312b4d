"""Bad input, saved models and tokenizers: a `config.json` that does not describe the weights beside it (fewer or
more layers, another width), a model folder without its tokenizer, a tokenizer with no usable vocabulary and a corrupt
model in the demo's cache. Each is refused with one `UserInputError` naming the folder and the fix, instead of a
silently truncated or partly random model, a traceback with misleading advice, or a failure much later; the user's
files stay as they were (the autouse `user_files_untouched` check, and each case's own).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from bad_input_fixtures import (
    error_line,
    make_project,
    run_cli,
    snapshot,
    user_files_untouched,  # noqa: F401 - the autouse check of every case
)
from text_fixtures import char_tokenizer
from tofu_fixtures import write_muse_folder

from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.models import ARCHITECTURES, atomic_save_pretrained, build_model, load_causal_lm, small_causal_lm

#: a demo experiment that builds its data in seconds (the cache case fails before any training)
TINY_EXPERIMENT = {"corpus_bytes": 40_000, "canaries_per_group": 2, "repetitions": [2, 8], "n_references": 6,
                   "secret_length": 4, "vocab_size": 300, "max_length": 64, "hidden": 32, "layers": 1, "heads": 2,
                   "batch_size": 8, "train_steps": 40, "warmup_steps": 5}


def saved_gpt2(folder: Path, *, layers: int = 2, hidden: int = 16, tokenizer: bool = True) -> Path:
    """A tiny GPT-2 saved with `save_pretrained` into `folder` (with the char tokenizer unless `tokenizer=False`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=2, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes: object) -> None:
    """Change keys of the saved `config.json` (the weights stay as they are)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def refusal(folder) -> str:
    """The message of `load_causal_lm`'s refusal of `folder` (it must refuse)."""
    with pytest.raises(UserInputError) as info:
        load_causal_lm(folder)
    return str(info.value)


def weights_only(model: Path, folder: Path) -> Path:
    """A copy of a saved model without its tokenizer: config.json, generation_config.json and the weights."""
    folder.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (model / name).is_file():
            shutil.copy2(model / name, folder / name)
    return folder


# ---------------------------------------------------------------- config.json vs the weights


def test_a_config_with_fewer_layers_than_the_weights_is_refused_naming_the_weights_it_would_drop(tmp_path):
    """n_layer 1 over the weights of 2 layers: transformers logged a report and returned a 1-layer model."""
    folder = saved_gpt2(tmp_path / "model", layers=2)
    edit_config(folder, n_layer=1)
    message = refusal(folder)
    assert f"config.json does not match the weights in model.safetensors of '{folder}'" in message
    # 12 weights a layer, less attn.c_attn.bias, which GPT-2's own ignore pattern ("attn.bias") leaves out
    assert "11 weights in the file that the config's model has no place for (transformer.h.1." in message
    assert "they would be dropped" in message and "put the config.json saved with these weights" in message


def test_a_config_with_more_layers_than_the_weights_is_refused_naming_the_weights_it_would_invent(tmp_path):
    """n_layer 3 over the weights of 2 layers: a model with a randomly initialised layer, which was then unlearned."""
    folder = saved_gpt2(tmp_path / "model", layers=2)
    edit_config(folder, n_layer=3)
    message = refusal(folder)
    assert f"'{folder}'" in message and "config.json does not match the weights" in message
    assert "12 weights of the config's model not in the file (transformer.h.2." in message
    assert "they would be random" in message and "and 9 more" in message


def test_a_config_of_another_width_is_refused_instead_of_advising_ignore_mismatched_sizes(tmp_path):
    """n_embd 8 over weights of width 16: a RuntimeError traceback saying to set ignore_mismatched_sizes=True."""
    folder = saved_gpt2(tmp_path / "model", hidden=16)
    edit_config(folder, n_embd=8)
    message = refusal(folder)
    assert f"config.json does not match the weights in model.safetensors of '{folder}'" in message
    assert "of another shape (transformer.h.0.attn.c_attn.bias: 48 in the file, 24 in the config" in message
    assert "ignore_mismatched_sizes" not in message
    with pytest.raises(UserInputError, match=r"^model\.model: config\.json does not match the weights"):
        build_model(folder)  # what UnlearningModule (the fit command) calls


def test_the_fit_command_refuses_a_model_whose_config_does_not_match_its_weights(tmp_path):
    project = make_project(tmp_path, layers=2)
    edit_config(project.model, n_layer=1)
    project.initial = project.snapshot()  # the edited config is the user's file now: it must stay as it is
    code, out, err = run_cli(["fit", "--config", str(project.config)], project.root)
    error_line(code, err, "model.model: config.json does not match the weights in model.safetensors",
               f"'{project.model}'", "transformer.h.1.")
    assert "unlearning status" not in out and not project.output.exists()


def test_the_evaluate_command_refuses_a_model_whose_config_does_not_match_its_weights(tmp_path):
    folder = saved_gpt2(tmp_path / "model", layers=2)
    edit_config(folder, n_layer=3)
    muse = write_muse_folder(tmp_path / "muse")
    before = snapshot(folder)
    code, _, err = run_cli(["evaluate", "--model", str(folder), "--muse", str(muse), "--device", "cpu"], tmp_path)
    error_line(code, err, "config.json does not match the weights", f"'{folder}'", "transformer.h.2.")
    assert snapshot(folder) == before


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saved_models_of_every_architecture_still_load(tmp_path, arch, tie):
    """No false alarm: a tied lm_head the file leaves out, rotary buffers and weights written from a state dict (the
    FSDP path of `atomic_save_pretrained`) are what transformers expects, not a mismatch."""
    model = small_causal_lm(arch, tie_embeddings=tie)
    atomic_save_pretrained(model, tmp_path / "saved")
    atomic_save_pretrained(model, tmp_path / "from_state_dict", state_dict=dict(model.state_dict()))
    expected = model.state_dict()
    for folder in ("saved", "from_state_dict"):
        loaded = load_causal_lm(tmp_path / folder).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), (arch, tie, folder)


def test_buffers_older_transformers_saved_with_the_weights_are_no_mismatch(tmp_path):
    """Checkpoints of older transformers versions hold attention masks (GPT-2's attn.bias and attn.masked_bias), a
    duplicate of the tied lm_head and rotary frequencies: buffers, never learned, so no reason to refuse."""
    from safetensors.torch import load_file, save_file

    small_causal_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    weights = load_file(str(tmp_path / "gpt2" / "model.safetensors"))
    weights["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    weights["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()
    save_file(weights, str(tmp_path / "gpt2" / "model.safetensors"), metadata={"format": "pt"})
    load_causal_lm(tmp_path / "gpt2")

    small_causal_lm("llama").save_pretrained(tmp_path / "llama")
    weights = load_file(str(tmp_path / "llama" / "model.safetensors"))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, str(tmp_path / "llama" / "model.safetensors"), metadata={"format": "pt"})
    load_causal_lm(tmp_path / "llama")


# ---------------------------------------------------------------- tokenizers


def test_a_model_folder_without_tokenizer_files_is_refused_as_a_tokenizer(tmp_path):
    """AutoTokenizer loaded a 1-token tokenizer from config.json alone: every text encoded to nothing."""
    folder = saved_gpt2(tmp_path / "model", tokenizer=False)
    with pytest.raises(UserInputError) as info:
        load_tokenizer(folder)
    message = str(info.value)
    assert f"the folder '{folder}' holds a model saved without its tokenizer" in message
    assert "tokenizer.json" in message and "data.tokenizer" in message and "--tokenizer" in message


def test_a_tokenizer_that_encodes_text_to_no_token_is_refused(tmp_path):
    """Tokenizer files with no usable vocabulary (one special token): found as a folder, refused as a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"<eos>": 0}, merges=[])),
                                    eos_token="<eos>")
    empty.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(UserInputError, match=rf"loaded from '{tmp_path / 'tokenizer'}' encodes every text to no "
                                             r"token \(1 token\(s\) in its vocabulary"):
        load_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(UserInputError, match="encodes every text to no token"):
        load_tokenizer(empty)
    assert len(load_tokenizer(char_tokenizer())("hello 42")["input_ids"]) == 8  # a usable one still loads


def test_the_fit_command_refuses_a_model_folder_without_its_tokenizer(tmp_path):
    project = make_project(tmp_path)
    bare = weights_only(project.model, tmp_path / "weights_only")
    code, out, err = run_cli(["fit", "--config", str(project.config), "--model.model", str(bare),
                              "--data.tokenizer", str(bare)], project.root)
    error_line(code, err, f"the folder '{bare}' holds a model saved without its tokenizer", "data.tokenizer")
    assert "unlearning status" not in out and not project.output.exists()


def test_the_evaluate_command_refuses_a_model_folder_without_its_tokenizer(tmp_path):
    """The model folder is the default tokenizer: an IndexError from a metric on empty encodings before."""
    folder = saved_gpt2(tmp_path / "model", tokenizer=False)
    muse = write_muse_folder(tmp_path / "muse")
    code, _, err = run_cli(["evaluate", "--model", str(folder), "--muse", str(muse), "--device", "cpu"], tmp_path)
    error_line(code, err, f"the folder '{folder}' holds a model saved without its tokenizer", "--tokenizer")
    assert "IndexError" not in err


# ---------------------------------------------------------------- the demo's cache


def cached_entry(entry: Path, seconds: float = 1.5) -> Path:
    """A cache entry as `Experiment.train` writes it: a saved model and its training.json."""
    atomic_save_pretrained(small_causal_lm("gpt2"), entry)
    (entry / "training.json").write_text(json.dumps({"seconds": seconds, "steps": 3, "split": "full"}))
    return entry


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated_weights", "missing_weights", "broken_config", "broken_training_json"])
def test_a_corrupt_cached_model_is_refused_naming_the_cache_entry_and_kept(tmp_path, damage):
    from lightning_unlearn.experiment import Experiment, ExperimentConfig

    exp = Experiment(ExperimentConfig(**{**TINY_EXPERIMENT, "repetitions": (2, 8)}), tmp_path / "out",
                     progress=False, accelerator="cpu")
    entry = cached_entry(exp.cache / "original")
    assert isinstance(exp.train("full"), torch.nn.Module) and exp.timings["train_seconds"] == 1.5  # a good entry
    if damage == "truncated_weights":
        truncate(entry / "model.safetensors")
    elif damage == "missing_weights":
        (entry / "model.safetensors").unlink()
    elif damage == "broken_config":
        (entry / "config.json").write_text("{not json")
    else:
        (entry / "training.json").write_text('{"seconds": ')
    files = snapshot(entry)
    with pytest.raises(UserInputError, match=rf"the cached model '{entry}' cannot be loaded \(.+\): it is corrupt or "
                                             "incomplete; delete that folder to train it again"):
        exp.train("full")
    assert snapshot(entry) == files  # never deleted nor repaired behind the user's back


def test_the_demo_with_a_corrupt_cached_model_is_one_error_line(tmp_path):
    """`lightning-unlearn demo --cache DIR` over a truncated cached model.safetensors: a SafetensorError traceback
    ("incomplete metadata") before."""
    from lightning_unlearn.cli import load_demo_config

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"experiment": TINY_EXPERIMENT,
                                                        "unlearning": {"curvature_batches": 2}}))
    config, _ = load_demo_config(str(tmp_path / "tiny.yaml"))
    cache = tmp_path / "models"
    entry = cached_entry(cache / "cache" / config.key() / "original")
    truncate(entry / "model.safetensors")
    output = tmp_path / "runs" / "demo"
    code, out, err = run_cli(["demo", "--config", "tiny.yaml", "--output", str(output), "--cache", str(cache),
                              "--quiet"], tmp_path)
    error_line(code, err, f"the cached model '{entry}' cannot be loaded", "delete that folder to train it again")
    assert "SafetensorError" not in err and (entry / "model.safetensors").is_file() and not output.exists()
