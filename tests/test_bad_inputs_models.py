"""Bad input, saved models and tokenizers: a `config.json` that does not describe the weights beside it (fewer or
more layers, another width), a model folder without its tokenizer, a tokenizer with no usable vocabulary and a corrupt
model in the demo's cache. Each is refused with one `UserInputError` naming the folder and the fix, instead of a
silently truncated or partly random model, a traceback with misleading advice, or a failure much later; the user's
files stay as they were (the autouse `user_files_untouched` check, and each case's own).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
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


# ---------------------------------------------------------------- model kinds the curvature engine meets

VOCAB, LENGTH = 32, 8


def lm_batches(n: int = 2, rows: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token batches for the tiny models below (every position labelled)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (rows, LENGTH), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class TinyLM(torch.nn.Module):
    """A plain causal LM (no `.config`): embeddings, causal mean mixing, two blocks (checkpointed when `reentrant` is
    not None, as some models do inside their forward), a head."""

    def __init__(self, reentrant: bool | None = None, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.blocks = torch.nn.ModuleList([Block(d), Block(d)])
        self.head = torch.nn.Linear(d, VOCAB)
        self.reentrant = reentrant

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(input_ids)
        x = x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[None, :, None]
        for block in self.blocks:
            if self.reentrant is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


def fit_and_step(backend: str, model: torch.nn.Module, batches, *, ones: bool = False, **kwargs):
    """Fit `backend` on `batches` and take one damped Newton direction of the first batch's loss (of a vector of ones
    with `ones=True`)."""
    from lightning_unlearn.curvature import build_curvature, gradient

    curvature = build_curvature(backend, model, **kwargs).fit(batches)
    if ones:
        params = dict(model.named_parameters())
        vector = {n: torch.ones_like(params[n]) for n in curvature.param_names}
    else:
        loss = curvature.objective.loss(curvature.logits(batches[0]), batches[0])
        vector = gradient(model, loss, curvature.param_names)
    return curvature, curvature.inverse(vector, damping=0.1, mode="relative")


@pytest.mark.parametrize("backend", ["kfac", "woodfisher", "diagonal"])
def test_reentrant_activation_checkpointing_inside_the_forward_is_refused_by_name(backend):
    """torch.utils.checkpoint(..., use_reentrant=True) runs the blocks under no_grad: woodfisher updated the head
    alone (with the embeddings frozen, zeros for every block weight), kfac and diagonal raised torch's errors."""
    model = TinyLM(reentrant=True).eval()
    model.emb.weight.requires_grad_(False)  # the request's case: the checkpoint's input needs no grad
    with warnings.catch_warnings(), \
            pytest.raises(UserInputError, match=r"use_reentrant=True.*use_reentrant=False.*gradient_checkpointing"):
        warnings.simplefilter("ignore")  # torch's "None of the inputs have requires_grad=True" (a warning only)
        fit_and_step(backend, model, lm_batches())
    model.emb.weight.requires_grad_(True)
    with pytest.raises(UserInputError, match=r"use_reentrant=True.*use_reentrant=False"):
        fit_and_step(backend, model, lm_batches())


def test_reentrant_checkpointing_is_refused_by_gradient_and_non_reentrant_gives_the_plain_result():
    """`gradient` returned zeros for the checkpointed blocks' weights (the checkpoint's node never ran)."""
    from lightning_unlearn.curvature import CrossEntropyObjective, gradient, model_logits

    batch = lm_batches(1)[0]
    model = TinyLM(reentrant=True).eval()
    loss = CrossEntropyObjective().loss(model_logits(model, batch), batch)
    with pytest.raises(UserInputError, match=r"\['blocks\.0\.fc1\.weight'\].*reentrant.*use_reentrant=False"):
        gradient(model, loss, ["blocks.0.fc1.weight", "head.weight"])
    # use_reentrant=False is what the message advises: the same step as without checkpointing
    plain = fit_and_step("kfac", TinyLM().eval(), lm_batches())[1]
    checkpointed = fit_and_step("kfac", TinyLM(reentrant=False).eval(), lm_batches())[1]
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_cg_refuses_activation_checkpointing_inside_the_forward_naming_torch_func(reentrant):
    """torch.func's jvp/vjp raised "must override the setup_context staticmethod" / "don't yet support saved tensor
    hooks"."""
    with pytest.raises(UserInputError, match=r"cg: .*activation checkpointing.*torch\.func.*curvature='kfac'"):
        fit_and_step("cg", TinyLM(reentrant=reentrant).eval(), lm_batches(), ones=True, max_iter=3)


def test_cg_refuses_a_forward_hook_that_reads_tensor_data():
    """An activation recorder calling .numpy() under torch.func.jvp: "Cannot access data pointer of Tensor that
    doesn't have storage"."""
    model = small_causal_lm("gpt2", vocab_size=VOCAB).eval()
    recorded = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: recorded.append(o.detach().numpy().sum()))
    with pytest.raises(UserInputError, match=r"cg: a hook .* reads tensor data.*torch\.func.*remove such hooks"):
        fit_and_step("cg", model, lm_batches(), ones=True, max_iter=3)
    assert recorded  # the hook did run on the ordinary forward


def tiny_mixtral():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("backend", ["kfac", "woodfisher", "cg"])
def test_moe_weights_are_covered_and_what_a_curvature_leaves_out_is_named(backend):
    """transformers 5's Mixtral keeps its experts as 3-D parameters and its router as a bare weight: kfac and
    woodfisher tracked the nn.Linear layers only, and the experts (most of the weights) never moved without a word.
    Now both are covered (one K-FAC block per expert, the router a linear layer: `test_curvature_experts.py`); where
    they are not (K-FAC's "reduce" convention, which has no per-sequence average of routed rows), they are named."""
    from lightning_unlearn.curvature import build_curvature
    from lightning_unlearn.curvature.layers import UncoveredParametersWarning

    model = tiny_mixtral()
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers version keeps Mixtral's experts as nn.Linear layers (covered)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_curvature(backend, model)
        build_curvature("diagonal", model)  # covers every parameter
    if backend != "kfac":
        return
    with pytest.warns(UncoveredParametersWarning) as record:
        build_curvature(backend, model, kfac_approx="reduce")
    assert len(record) == 1
    message = str(record[0].message)
    kinds = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
    assert all(f"model.layers.*.mlp.{kind}" in message for kind in kinds)
    assert "embed_tokens" not in message and "lm_head" not in message and "norm" not in message
    assert "curvature='diagonal'" in message and "freeze" in message and "%" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_curvature(backend, model, kfac_approx="reduce", exclude="experts|gate")  # left out on purpose


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_tiny_architectures_have_no_uncovered_weights(tie):
    """No false alarm: embeddings, the LM head and 1-D norms are left out by design."""
    from lightning_unlearn.curvature import build_curvature

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for arch in ARCHITECTURES:
            model = small_causal_lm(arch, tie_embeddings=tie)
            for backend in ("kfac", "woodfisher", "cg"):
                build_curvature(backend, model)


class SharedLinear(TinyLM):
    """One nn.Parameter in two different nn.Linear modules (cross-layer weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks[1].fc1.weight = self.blocks[0].fc1.weight


def test_a_parameter_shared_by_two_linear_modules_is_refused_by_kfac_and_handled_by_the_others():
    """woodfisher crashed in finalize (the parameter listed twice); kfac tracked both layers under one weight name,
    the second layer's factors replacing the first's."""
    from lightning_unlearn.curvature import WoodFisher, build_curvature, gradient
    from lightning_unlearn.curvature.layers import covered_parameters

    model = SharedLinear().eval()
    with pytest.raises(UserInputError, match=r"'blocks\.0\.fc1\.weight' is shared by the tracked layers "
                                             r"\['blocks\.0\.fc1', 'blocks\.1\.fc1'\].*curvature='diagonal' or 'cg'"):
        build_curvature("kfac", model)
    names = covered_parameters(model, None, None, None)
    assert names.count("blocks.0.fc1.weight") == 1 and "blocks.1.fc1.bias" in names
    batches = lm_batches()
    for backend in ("woodfisher", "diagonal", "cg"):
        curvature, step = fit_and_step(backend, model, batches, **({"max_iter": 3} if backend == "cg" else {}))
        assert len(set(curvature.param_names)) == len(curvature.param_names)
        assert all(torch.isfinite(t).all() for t in step.values()) and step["blocks.0.fc1.weight"].abs().sum() > 0
    # the shared weight's rows are its whole per-example gradient (both uses): vᵀFv = Σ_i (g_iᵀv)² / N
    wf = WoodFisher(model, blocks="layer").fit(batches)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters() if n in wf.param_names}
    expected, count = 0.0, 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            one = {k: t[row:row + 1] for k, t in batch.items()}
            logits = wf.logits(one)
            pos = wf.objective.positions(logits, one)
            loss = wf.objective.per_position_loss(pos.outputs, pos.targets).sum()
            g = gradient(model, loss, wf.param_names)
            expected += float(sum((g[n].double() * v[n].double()).sum() for n in wf.param_names)) ** 2
            count += pos.count
    layer = dict(zip(wf.groups, range(len(wf.groups))))
    assert ("blocks.0.fc1.weight", "blocks.0.fc1.bias") in layer and ("blocks.1.fc1.bias",) in layer
    full = WoodFisher(model, blocks="full").fit(batches)
    assert full.quadratic(v) == pytest.approx(expected / count, rel=1e-4)


class Unused(TinyLM):
    """An nn.Linear the forward never calls (a spare head)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = torch.nn.Linear(8, 8)


class DetachedAux(Unused):
    """`aux` runs, but its output never reaches the logits."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.aux(self.emb(input_ids)).detach()
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize("model_class", [Unused, DetachedAux], ids=["never_called", "output_detached"])
def test_kfac_names_a_layer_that_never_reaches_the_loss_and_how_to_exclude_it_in_a_request(model_class):
    """A plain RuntimeError saying `exclude=...`, without the request API's way to pass it."""
    from lightning_unlearn.curvature import build_curvature
    from lightning_unlearn.settings import UnlearnSettings

    model = model_class().eval()
    fix = "UnlearnSettings(curvature_kwargs={'exclude': ['^aux$']})"
    with pytest.raises(UserInputError, match=r"'aux'.*" + re.escape(fix)):
        fit_and_step("kfac", model, lm_batches())
    settings = UnlearnSettings(curvature="kfac", curvature_kwargs={"exclude": ["^aux$"]})
    curvature = build_curvature(settings.curvature, model, **settings.backend_kwargs()).fit(lm_batches())
    assert "aux.weight" not in curvature.param_names and "head.weight" in curvature.param_names


@pytest.mark.parametrize("backend", ["kfac", "woodfisher", "cg", "diagonal"])
def test_a_model_with_every_parameter_frozen_is_refused_as_such(backend):
    """kfac, cg, woodfisher said "no trackable layer ... or use the 'diagonal' backend", which then said "no
    trainable parameter": two plain ValueErrors."""
    from lightning_unlearn.curvature import build_curvature

    model = small_causal_lm("gpt2", vocab_size=VOCAB).requires_grad_(False)
    with pytest.raises(UserInputError, match=r"no trainable parameter \(every parameter has requires_grad=False\)"
                                             r".*unfreeze the parameters to unlearn") as info:
        build_curvature(backend, model)
    assert "diagonal" not in str(info.value)


class NeedsMask(TinyLM):
    def forward(self, input_ids, attention_mask):  # the mask is required
        assert attention_mask is not None and attention_mask.shape == input_ids.shape
        return super().forward(input_ids) * attention_mask[..., None]


class KeywordOnly(TinyLM):
    def forward(self, *, input_ids, attention_mask=None):
        return super().forward(input_ids)


class DictOut(TinyLM):
    def forward(self, input_ids, attention_mask=None):
        return {"logits": super().forward(input_ids), "hidden": None}


class LossFirst(TinyLM):
    def forward(self, input_ids, attention_mask=None):
        logits = super().forward(input_ids)
        return logits.mean(), logits


@pytest.mark.parametrize("model_class", [NeedsMask, KeywordOnly, DictOut], ids=["required_mask", "keyword_only",
                                                                                "dict"])
def test_plain_modules_get_the_attention_mask_and_keywords_their_forward_asks_for(model_class):
    """forward(input_ids, attention_mask) failed with Python's missing-argument TypeError, a keyword-only forward with
    "takes 1 positional argument", a dict output with "model returned dict"."""
    from lightning_unlearn.curvature import model_logits

    batch = lm_batches(1)[0]
    batch["attention_mask"][0, -2:] = 0
    expected = TinyLM()(batch["input_ids"])
    if model_class is NeedsMask:
        expected = expected * batch["attention_mask"][..., None]
    assert torch.equal(model_logits(model_class(), batch), expected)
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert model_logits(model_class(), no_mask).shape == (4, LENGTH, VOCAB)  # a required mask: all ones
    fit_and_step("kfac", model_class().eval(), lm_batches())


def test_outputs_that_are_not_logits_are_refused_naming_the_expected_form():
    """(loss, logits) gave "labels (8, 16) do not match logits ()"."""
    from lightning_unlearn.curvature import model_logits

    batch = lm_batches(1)[0]
    with pytest.raises(UserInputError, match=r"tuple whose first element is a tensor of shape \(\).*logits \[batch, "
                                             r"time, vocab\] first.*\(loss, logits, \.\.\.\)"):
        model_logits(LossFirst(), batch)

    class NoLogits(TinyLM):
        def forward(self, input_ids, attention_mask=None):
            return {"hidden": super().forward(input_ids)}

    with pytest.raises(UserInputError, match=r"without a 'logits' entry \(keys \['hidden'\]\)"):
        model_logits(NoLogits(), batch)


def test_an_encoder_decoder_model_is_refused_as_not_a_causal_lm():
    """A tiny T5 passed by mistake failed inside transformers ("You have to specify either decoder_input_ids...")."""
    from transformers import T5Config, T5ForConditionalGeneration

    from lightning_unlearn.curvature import model_logits
    from lightning_unlearn.curvature.objective import check_causal_lm

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0))
    with pytest.raises(UserInputError, match=r"T5ForConditionalGeneration is an encoder-decoder model.*"
                                             r"AutoModelForCausalLM"):
        check_causal_lm(t5)
    with pytest.raises(UserInputError, match="encoder-decoder"):
        model_logits(t5, lm_batches(1)[0])
    check_causal_lm(small_causal_lm("gpt2"))  # a causal LM passes


def test_masked_lm_and_task_heads_are_refused_as_not_causal_lms():
    """A BERT masked LM sees the token it is asked to predict: it was accepted and unlearned to "target_reached" after 0
    steps; a sequence classifier failed with "labels (8, 16) do not match logits (8,)"."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2ForSequenceClassification

    from lightning_unlearn.curvature import model_logits

    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(UserInputError, match=r"BertForMaskedLM is not a causal language model \(a MaskedLM head\)"):
        model_logits(bert, lm_batches(1)[0])
    classifier = GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2,
                                                          pad_token_id=0))
    with pytest.raises(UserInputError, match=r"not a causal language model \(a SequenceClassification head\)"):
        model_logits(classifier, lm_batches(1)[0])
