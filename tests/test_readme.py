"""Every ```python block of README.md and of the reference docs runs as printed, offline, on tiny models; the
README stays a short front door whose test command is the one CI runs, and the documentation's links resolve.

A snippet takes some things from the reader: a model, batches or loaders, a LightningModule and its data, files
such as `runs/demo/original`. `BLOCKS` names, for each file and each of its blocks, what the block takes (`given`),
and the test builds tiny versions of exactly those: one byte-level BPE tokenizer, GPT-2 models of a few thousand
parameters, short "record" texts, and files written into a temporary working directory at the paths the snippet
uses. Nothing in the code is substituted: a block runs statement by statement as it appears in its file (the Fabric
block as its own script, since `fabric.launch()` starts a second process). A new block must be added to `BLOCKS`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_unlearn.data import Collate, insert_canaries, make_canaries, train_bpe_tokenizer
from lightning_unlearn.models import small_causal_lm

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()

#: file -> block name -> (a string only that block of the file contains, the names it takes from the reader)
BLOCKS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "README.md": {
        "callback": ("from lightning_unlearn.callbacks import Unlearn",
                     ("forget_loader", "retain_loader", "holdout_loader", "my_module", "my_data", "new_forget")),
        "module": ("UnlearningModule(", ("runs/demo",)),
        "fabric": ("fabric_unlearn(fabric", ("model", "forget_loader", "retain_loader", "holdout_loader")),
        "engine": ('build_unlearner("newton", model)',
                   ("model", "forget_batches", "retain_batches", "holdout_batches")),
    },
    "docs/curvature.md": {
        "curvature": ("curvature = KFAC(model", ("model", "retain_batches", "forget_batch")),
    },
    "docs/methods.md": {
        "methods": ('build_unlearner("newton", model)',
                    ("model", "forget_batches", "retain_batches", "held", "holdout_batches")),
    },
    "docs/data.md": {
        "datamodule": ('"corpus.jsonl"', ("corpus.jsonl", "model")),
        "canaries": ("insert_canaries(corpus", ()),
    },
    "docs/reports.md": {
        "report": ("write_report(", ("model", "forget_loader", "holdout_loader", "test_loader", "tokenizer",
                                     "registry", "retrained_model", "hparams", "timings", "forget_texts", "secrets")),
    },
}
CASES = [(doc, name) for doc, blocks in BLOCKS.items() for name in blocks if (doc, name) != ("README.md", "fabric")]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S)]


def named_blocks(doc: str = "README.md") -> dict[str, tuple[int, str]]:
    """name -> (line number, code) of every ```python block of `doc` (a path relative to the repository root)."""
    out: dict[str, tuple[int, str]] = {}
    for line, code in python_blocks((ROOT / doc).read_text()):
        names = [name for name, (marker, _) in BLOCKS[doc].items() if marker in code]
        assert len(names) == 1, f"{doc}:{line}: a python block matching {names or 'no entry'} of BLOCKS[{doc!r}]; " \
                                "give each block one entry (its marker and what it takes from the reader)"
        assert names[0] not in out, f"{doc}:{line}: a second block for {names[0]!r}"
        out[names[0]] = (line, code)
    return out


# ------------------------------------------------------------------ what the snippets take from the reader


def texts(start: int, n: int) -> list[str]:
    """Short structured records: a model learns their pattern, so unseen ones of the same kind are a held-out
    retain set."""
    return [f"record {i}: " + " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(5)) + f". code {i * 37 % 100}."
            for i in range(start, start + n)]


TRAIN, FORGET, NEW_FORGET = texts(0, 40), texts(0, 4), texts(4, 3)  # forget sets are training texts
HOLDOUT, HELD, TEST = texts(100, 8), texts(200, 8), texts(300, 8)  # never trained on


def tokenizer():
    return train_bpe_tokenizer(texts(0, 400), vocab_size=300)


def tiny_lm(tok, seed: int = 0, vocab: int | None = None) -> torch.nn.Module:
    return small_causal_lm("gpt2", vocab_size=vocab or len(tok), hidden=32, layers=2, heads=2, max_positions=64,
                           seed=seed)


def loader(tok, rows: list[str], batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    """A DataLoader of batch dicts (input_ids, attention_mask, labels -100 on padding, example_id)."""
    data = [{"input_ids": (ids := tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]),
             "labels": list(ids), "example_id": i} for i, t in enumerate(rows)]
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=Collate(tok.pad_token_id),
                      generator=torch.Generator().manual_seed(0) if shuffle else None)


class MyModule(L.LightningModule):
    """A reader's LightningModule: a causal LM as `self.model`, trained on its NLL."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MyData(L.LightningDataModule):
    """A reader's data module: the training texts (retain and forget)."""

    def __init__(self, tok) -> None:
        super().__init__()
        self.tok = tok

    def train_dataloader(self) -> DataLoader:
        return loader(self.tok, TRAIN, shuffle=True)


def write_demo_files(root: Path, tok) -> None:
    """What `lightning-unlearn demo` leaves in runs/demo: the original model with its tokenizer, the training
    text with canaries (`canary_id`, `spans`) and never-inserted canaries labelled on their secret (the holdout)."""
    from lightning_unlearn.demo import write_canaries

    tiny_lm(tok).save_pretrained(root / "runs/demo/original")
    tok.save_pretrained(str(root / "runs/demo/original"))
    registry = make_canaries(2, repetitions=(1, 2), template="my pin is {d} {d} {d}", length=3, n_references=4)
    data = insert_canaries(TRAIN, registry, seed=0)
    (root / "runs/demo/data").mkdir(parents=True)
    data.to_json(str(root / "runs/demo/data/train.jsonl"), lines=True)
    write_canaries(registry.references, root / "runs/demo/data/holdout.jsonl")


def given(names: tuple[str, ...], root: Path) -> dict[str, Any]:
    """Tiny stand-ins for the names (and files, for names with a '/' or a '.') a block takes from the reader."""
    tok = tokenizer()
    torch.manual_seed(0)
    make = {
        "model": lambda: tiny_lm(tok),
        "tokenizer": lambda: tok,
        "retrained_model": lambda: tiny_lm(tok, seed=1),
        "retain_batches": lambda: list(loader(tok, TRAIN[8:])),
        "forget_batch": lambda: next(iter(loader(tok, FORGET))),
        "forget_batches": lambda: list(loader(tok, FORGET, batch_size=2)),
        "held": lambda: next(iter(loader(tok, HELD))),
        "holdout_batches": lambda: list(loader(tok, HOLDOUT, batch_size=4)),
        "forget_loader": lambda: loader(tok, FORGET, batch_size=2),
        "retain_loader": lambda: loader(tok, TRAIN[8:]),
        "holdout_loader": lambda: loader(tok, HOLDOUT, batch_size=4),
        "test_loader": lambda: loader(tok, TEST),
        "new_forget": lambda: loader(tok, NEW_FORGET),
        "my_module": lambda: MyModule(tiny_lm(tok)),
        "my_data": lambda: MyData(tok),
        "registry": lambda: make_canaries(2, repetitions=(1,), template="my pin is {d} {d}", length=2,
                                          n_references=4),
        "hparams": lambda: {"method": "newton", "damping": 0.1},
        "timings": lambda: {"unlearn_seconds": 1.0},
        "forget_texts": lambda: list(FORGET),
    }
    out: dict[str, Any] = {}
    for name in names:
        if name == "runs/demo":
            write_demo_files(root, tok)
        elif name == "corpus.jsonl":
            rows = [{"text": t, "doc_id": f"doc-{i}"} for i, t in enumerate(texts(0, 60))]
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif name == "model" and "corpus.jsonl" in names:  # the data module trains its own 1024-token BPE
            out[name] = tiny_lm(tok, vocab=1024)
        elif name == "secrets":
            out[name] = [c.secret for c in out["registry"].inserted]
        else:
            out[name] = make[name]()
    return out


# ------------------------------------------------------------------ running a block


def statements(code: str, doc: str = "README.md") -> list[tuple[str, Any]]:
    """(source, compiled code) of each top-level statement of a block."""
    tree = ast.parse(code)
    return [(ast.get_source_segment(code, node) or "", compile(ast.Module([node], []), f"<{doc}>", "exec"))
            for node in tree.body]


def held_out_loss(model: torch.nn.Module, tok) -> float:
    """Mean NLL per token of never-trained texts of the retain set's kind."""
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in loader(tok, HELD):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"]).loss) * n
            count += n
    return total / count


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


@pytest.mark.parametrize("doc", list(BLOCKS))
def test_every_block_is_known(doc):
    assert set(named_blocks(doc)) == set(BLOCKS[doc])


@pytest.mark.parametrize(("doc", "name"), CASES, ids=[f"{doc}:{name}" for doc, name in CASES])
def test_block_runs(doc, name, workdir, capsys):
    line, code = named_blocks(doc)[name]
    ns: dict[str, Any] = {"__name__": "__main__", **given(BLOCKS[doc][name][1], workdir)}
    tok = tokenizer()
    losses: list[float] = []
    for source, compiled in statements(code, doc):
        retain_free = "full_minus_forget" in source
        if retain_free:
            losses.append(held_out_loss(ns["my_module"].model, tok))
        try:
            exec(compiled, ns)
        except Exception as err:
            raise AssertionError(f"{doc}:{line}: the {name!r} block failed at\n{source}") from err
        if retain_free:
            losses.append(held_out_loss(ns["my_module"].model, tok))
    if name == "callback":  # the retain-free request must not wreck what the model knows
        before, after = losses
        assert after < 1.5 * before, f"held-out retain loss {before:.3f} -> {after:.3f} after the retain-free request"
        assert Path("curvature.pt").exists()
    if name == "module":
        assert (workdir / "runs/unlearned/config.json").exists()
        assert ns["module"].status == "target_reached", ns["module"].summary()
    if name == "engine":
        assert ns["unlearner"].status == "target_reached", ns["unlearner"].summary()
        assert ns["result"].status == "target_reached", ns["result"].summary


def test_fabric_block_runs_on_two_processes(workdir):
    """The Fabric block as its own script (fabric.launch() starts rank 1 by running the script again)."""
    line, code = named_blocks("README.md")["fabric"]
    prelude = textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conftest  # offline, one thread
        from test_readme import given
        globals().update(given({BLOCKS["README.md"]["fabric"][1]!r}, Path.cwd()))
        # ---- README.md:{line}
        """)
    script = workdir / "fabric_example.py"
    script.write_text(prelude + code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README.md:{line}: the Fabric block failed:\n{done.stderr[-3000:]}"
    # both processes print to one pipe, so their pieces may interleave; each summary dict is one write
    statuses = re.findall(r"'status': '(\w+)'", done.stdout)
    assert len(statuses) == 2 and len(set(statuses)) == 1, done.stdout
    assert statuses[0] == "target_reached", done.stdout


# ------------------------------------------------------------------ the README as a front door

#: the documentation files whose prose this suite holds to the house style (others keep their own)
STYLED = ["README.md", "benchmarks/README.md", "docs/cli.md", "docs/curvature.md", "docs/data.md",
          "docs/distributed.md", "docs/methods.md", "docs/metrics.md", "docs/recipe.md", "docs/reliability.md",
          "docs/reports.md"]


def test_readme_is_a_front_door():
    """At most 12 kB: the reference lives in docs/, the measurements in benchmarks/README.md and docs/recipe.md."""
    assert len(README.read_bytes()) <= 12_000, f"README.md is {len(README.read_bytes())} bytes; move reference to docs/"


def test_readme_test_command_is_what_ci_runs():
    """`.ci/run` runs the README's test command: the line after its marker comment is printed in README's Test."""
    ci = (ROOT / ".ci/run").read_text().splitlines()
    command = ci[ci.index("# The README's test command:") + 1].strip()
    test_section = README.read_text().split("\n## Test\n", 1)[1].split("\n## ", 1)[0]
    assert f"```bash\n{command}\n```" in test_section


def test_demo_output_names_its_versions():
    """The demo's printed numbers say which torch, lightning and transformers produced them."""
    text = README.read_text()
    for package in ("torch", "lightning", "transformers"):
        assert re.search(rf"{package} \d+\.\d+\.\d+", text), f"README.md: the demo output's {package} version"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_links_resolve(doc):
    """Every relative link of the documentation names a file that exists (and a heading of it, with `#`)."""
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{doc}: a link to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{doc}: a link to {target}, which has no heading #{anchor}"


@pytest.mark.parametrize("doc", STYLED)
def test_documentation_stands_alone(doc):
    """The documentation speaks of the package, not of how it was made: no issues, tickets, sessions or builds."""
    text = (ROOT / doc).read_text()
    for pattern in (r"\bissues?\b", r"\btickets?\b", r"\bsessions?\b", r"first build", r"seed paper",
                    r"this machine", r"\bthe build\b"):
        hits = re.findall(rf".{{0,40}}{pattern}.{{0,40}}", text, flags=re.I)
        assert not hits, f"{doc}: {hits}"
