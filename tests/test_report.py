"""The report: JSON/Markdown/PNG files, no forget text or canary secret in any of them, hashes, atomic writes."""

import json

import matplotlib.image as mpimg
import pytest
import torch
from text_fixtures import batches as _batches
from text_fixtures import char_tokenizer

from lightning_unlearn.data import make_canaries
from lightning_unlearn.metrics import canary_specs, evaluate
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.report import direction, hash_state_dict, hash_texts, write_report


def batches(tok, texts, batch_size=4):
    return _batches(tok, texts, batch_size)


def fit(model, data, steps: int, sign: float = 1.0, lr: float = 3e-3):
    """A few Adam steps of descent (sign=1) or ascent (sign=-1) on the batches."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = data[step % len(data)]
        loss = sign * model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


FORGET = [f"the account of member {n} is held in branch {n % 3}" for n in range(6)]
HOLDOUT = [f"the garden of house {n} faces street {n % 4}" for n in range(6)]
TEST = ["a plain sentence about rivers", "another sentence about hills"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tok = char_tokenizer()
    registry = make_canaries(2, (2, 8), template="my pin is {d} {d} {d} {d}", length=4, n_references=3, seed=1)
    canary_texts = [c.text for c in registry.inserted for _ in range(c.repetitions)]
    model = small_causal_lm("gpt2", vocab_size=64, hidden=48)
    fit(model, batches(tok, FORGET + canary_texts, 8), 60)
    kw = dict(forget=batches(tok, FORGET), holdout=batches(tok, HOLDOUT), test=batches(tok, TEST),
              canaries=registry, tokenizer=tok, progress=False)
    weights_before = hash_state_dict(model)
    before = evaluate(model, **kw)
    fit(model, batches(tok, FORGET + [c.text for c in registry.inserted], 8), 5, sign=-1.0, lr=1e-3)
    reference = small_causal_lm("gpt2", vocab_size=64, hidden=48, seed=1)
    after = evaluate(model, reference=reference, **kw)
    ref_metrics = evaluate(reference, **kw)
    secrets = FORGET + [c.secret for c in registry.inserted + registry.references] + \
        [c.text for c in registry.inserted + registry.references]
    out = tmp_path_factory.mktemp("report")
    files = write_report(
        out, before=before, after=after, reference=ref_metrics, method="gradient_ascent",
        hyperparameters={"lr": 1e-3, "steps": 5}, timings={"unlearn": 0.5}, seed=0,
        forget_sha256=hash_texts(FORGET), weights_before_sha256=weights_before,
        weights_after_sha256=hash_state_dict(model),
        runs=[{"name": "before", "metrics": before}, {"name": "after", "metrics": after}],
        secrets=secrets)
    return out, files, secrets, before, after


def test_report_files_hold_no_forget_text_nor_secret(run):
    out, files, secrets, _, _ = run
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in written} == {"report.json", "report.md", "exposure.png", "loss_histograms.png",
                                         "privacy_utility.png"}  # and no temporary file left behind
    for path in written:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{path.name} leaks a secret"


def test_report_json_and_markdown_content(run):
    out, files, _, before, after = run
    report = json.loads(files["json"].read_text())
    assert report["method"] == "gradient_ascent" and report["seed"] == 0
    assert report["hashes"]["forget_set_sha256"] == hash_texts(reversed(FORGET))  # order-independent
    assert report["hashes"]["weights_before_sha256"] != report["hashes"]["weights_after_sha256"]
    assert {"torch", "transformers", "torchmetrics", "python"} <= set(report["versions"])
    assert report["metrics"]["after"]["forget_quality"] == pytest.approx(after["forget_quality"])
    assert report["metrics"]["before"]["exposure/mean"] == pytest.approx(before["exposure/mean"])
    md = files["markdown"].read_text()
    assert "| `exposure/mean` | ↓ |" in md and "| `forget_quality` | ↑ |" in md and "![exposure](exposure.png)" in md
    assert before["exposure/mean"] > before["exposure/reference_mean"]  # training memorised the canaries


def test_plots_are_valid_pngs(run):
    out, files, *_ = run
    for key in ("exposure_plot", "loss_plot", "privacy_utility_plot"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(files[key])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_report_refuses_to_write_a_secret(tmp_path):
    with pytest.raises(ValueError, match="forget text or canary secret") as info:
        write_report(tmp_path, after={"test/perplexity": 3.0}, hyperparameters={"note": "the pin is 4 4 1 9"},
                     secrets=["4 4 1 9"])
    assert "4 4 1 9" not in str(info.value)
    assert not any(p.name.startswith("report") for p in tmp_path.iterdir())


def test_hashes_and_directions():
    a, b = small_causal_lm("gpt2", vocab_size=64), small_causal_lm("gpt2", vocab_size=64)
    assert hash_state_dict(a) == hash_state_dict(b) == hash_state_dict(a.state_dict())
    with torch.no_grad():
        next(b.parameters())[0, 0] += 1e-3
    assert hash_state_dict(a) != hash_state_dict(b)
    assert hash_state_dict(a.to(torch.bfloat16)) != hash_state_dict(b.to(torch.bfloat16))
    assert hash_texts(["x", "y"]) == hash_texts(["y", "x"]) != hash_texts(["x", "y", "y"])
    assert direction("mia/min_k/auroc")[0] == "↓" and direction("mia/min_k/reference_auroc")[0] == "·"
    assert direction("forget/perplexity")[0] == "↑" and direction("test/perplexity")[0] == "↓"


def test_registry_adapter_keeps_ids_as_names():
    registry = make_canaries(1, (3,), template="my pin is {d} {d} {d} {d}", length=4, n_references=2)
    specs = canary_specs(registry)
    assert [s.repetitions for s in specs] == [3, 0, 0] and specs[0].name == registry.inserted[0].id
    assert registry.inserted[0].secret not in repr(specs[0])


def test_summary_goes_to_the_top_level_and_leads_the_markdown(tmp_path):
    summary = {"curvature": "kfac", "timing": {"unlearn_seconds": 1.5},
               "before": {"exposure_inserted_mean": 12.0}, "after": {"exposure_inserted_mean": 2.0}}
    files = write_report(tmp_path, after={"test/perplexity": 3.0}, method="newton", summary=summary)
    report = json.loads(files["json"].read_text())
    assert report["curvature"] == "kfac" and report["after"]["exposure_inserted_mean"] == 2.0
    assert report["timing"]["unlearn_seconds"] == 1.5 and report["metrics"]["after"]["test/perplexity"] == 3.0
    md = files["markdown"].read_text()
    assert md.index("## Summary") < md.index("test/perplexity")
    assert "| `exposure_inserted_mean` | 12 | 2 |" in md
    with pytest.raises(ValueError, match="clash"):
        write_report(tmp_path, after={}, summary={"metrics": 1})


def test_the_run_status_and_target_lead_the_summary(tmp_path):
    summary = {"status": "target_reached", "target": 0.5, "target_source": "holdout",
               "before": {"forget_loss": 0.1}, "after": {"forget_loss": 2.0}}
    files = write_report(tmp_path, after={"test/perplexity": 3.0}, method="newton", summary=summary)
    report = json.loads(files["json"].read_text())
    assert (report["status"], report["target"], report["target_source"]) == ("target_reached", 0.5, "holdout")
    md = files["markdown"].read_text()
    assert "- status: `target_reached`" in md and "- target: 0.5 (source: `holdout`)" in md
    assert md.index("- status:") < md.index("| `forget_loss` |")
