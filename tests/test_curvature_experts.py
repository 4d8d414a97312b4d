"""Fused mixture-of-experts parameters (transformers 5 keeps experts as 3-D tensors): one K-FAC block per expert.

The oracle: on one example whose only target is at its first position, the empirical Fisher of every tracked block
is the outer product of that position's gradient with itself, which K-FAC's `A ⊗ G` equals exactly (one row `a`, one
`g`). The experts' rows come from `curvature/experts.py`'s routed forward, which must reproduce the model's own.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_unlearn.curvature import KFAC, build_curvature, gradient
from lightning_unlearn.curvature.experts import is_fused_experts, routed
from lightning_unlearn.curvature.layers import UncoveredParametersWarning, find_layers, split_label
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.models import small_causal_lm

VOCAB = 32


def tiny_gpt_oss() -> nn.Module:
    """GPT-OSS's experts are stored [experts, in, out] with biases and a clamped gate of their own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt_oss", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2,
                                  layer_types=["full_attention"] * 2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def moe_model(arch: str) -> nn.Module:
    return tiny_gpt_oss() if arch == "gpt_oss" else small_causal_lm(arch, vocab_size=VOCAB, hidden=16)


def lm_batch(n: int = 3, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_the_routed_forward_reproduces_the_model_and_sees_every_routed_token(arch):
    model = moe_model(arch)
    modules = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    assert len(modules) == 2
    batch = lm_batch()
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"]).logits
    rows: dict[str, list[int]] = {}

    def recorder(name):
        def record(expert, weight, x, out, token_rows):
            assert x.shape[0] == out.shape[0] == token_rows.shape[0] and not x.requires_grad
            rows.setdefault(f"{name}.{weight}", []).extend(token_rows.tolist())
        return record

    checked: set[str] = set()
    hooked = modules[0][1]
    own_forward = hooked.forward  # a forward set on the instance, as accelerate's dispatch hooks set one
    hooked.forward = own_forward
    with torch.no_grad(), routed(modules, recorder, checked):
        captured = model(input_ids=batch["input_ids"]).logits
    assert checked == {n for n, _ in modules}
    torch.testing.assert_close(captured, own, rtol=1e-5, atol=1e-5)
    tokens = batch["input_ids"].numel()
    assert len(rows) == 4 and all(sorted(r) == sorted(list(range(tokens)) * 2) for r in rows.values())  # top-2
    assert hooked.__dict__["forward"] is own_forward  # the instance's forward is back
    assert all("forward" not in m.__dict__ for _, m in modules[1:])  # and the class's


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_blocks_equal_the_empirical_fisher_on_one_position(arch):
    """Tokens [t0, t1] with labels: only position 0 has a target, so the loss's gradient is one `g aᵀ` per block and
    the empirical Fisher is its outer product; K-FAC's blocks must be exactly that, expert by expert (the two experts
    token 0 was routed to have it, the others nothing)."""
    model = moe_model(arch).double()
    model.set_experts_implementation("eager")  # grouped matrix products take no float64
    batch = lm_batch(n=1, length=2, seed=3)
    kfac = KFAC(model, fisher_type="empirical").fit([batch])
    experts = [layer for layer in kfac.layers if layer.expert is not None]
    assert len(experts) == 16
    pos = kfac.objective.positions(kfac.logits(batch), batch)
    assert pos.count == 1
    grad = gradient(model, kfac.objective.per_position_loss(pos.outputs, pos.targets).sum(), kfac.param_names)
    routed_blocks = 0
    for seed, layer in enumerate(kfac.layers):
        v = {n: torch.zeros_like(g) for n, g in grad.items()}
        for name in layer.param_names:  # a random vector on this block only (an expert: its slice)
            noise = torch.randn(grad[name].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            v[name] = noise if layer.expert is None else torch.zeros_like(noise).index_copy(
                0, torch.tensor([layer.expert]), noise[layer.expert:layer.expert + 1])
        expected = float(sum((grad[n] * v[n]).sum() for n in grad)) ** 2
        assert kfac.quadratic(v) == pytest.approx(expected, rel=1e-8, abs=1e-20), layer.name
        if layer.expert is not None and expected > 0:
            routed_blocks += 1
    assert routed_blocks == 2 * 2 * 2  # 2 layers × top-2 experts × (gate_up, down)
    # the products assemble each expert's block into its slice of the fused parameter
    v = {n: torch.randn_like(g) for n, g in grad.items()}
    d = kfac.apply(v, 0.5)
    for layer in experts:
        a, g = kfac.factor(layer.name)
        dense = torch.kron(g, a) + 0.5 * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
        m = layer.to_matrix(v)
        torch.testing.assert_close(layer.to_matrix(d).reshape(-1), torch.linalg.solve(dense, m.reshape(-1)))


def test_an_expert_without_curvature_stays_in_place_and_is_named():
    """An expert whose output gradients are zero on the curvature data (its down projection zero, like LoRA's B)
    has no curvature: relative damping would give its block the floor, and its Newton direction its gradient over
    1e-6 × a typical block's scale. Its slice, and only its slice, is left in place."""
    model = small_causal_lm("mixtral", vocab_size=VOCAB, hidden=16)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.down_proj[2].zero_()
    u = build_unlearner("newton", model)
    with pytest.warns(UncoveredParametersWarning, match=r"gate_up_proj\[2\]"):
        u.fit_curvature([lm_batch(n=4, length=12)])
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert f"{name}[2]" in u.uncurved and split_label(f"{name}[2]") == (name, 2)
    assert not any(label.startswith("model.layers.1") for label in u.uncurved)
    params = dict(model.named_parameters())
    g = {n: torch.randn_like(params[n]) for n in u.param_names}
    d = u.newton_direction(g)
    assert float(d[name][2].abs().max()) == 0.0
    assert all(float(d[name][e].abs().max()) > 0 for e in (0, 1, 3))
    assert float(g[name][2].abs().max()) > 0  # the caller's gradient is not changed


def test_an_experts_variant_the_routed_forward_does_not_reproduce_is_refused():
    model = small_causal_lm("mixtral", vocab_size=VOCAB, hidden=16)
    experts = model.model.layers[1].mlp.experts

    class Scaled(type(experts)):  # a variant of the module: its output scaled after the experts
        def forward(self, *args, **kwargs):
            return 2.0 * super().forward(*args, **kwargs)

    experts.__class__ = Scaled
    with pytest.raises(UserInputError, match=r"'model\.layers\.1\.mlp\.experts' computes something K-FAC's "
                                             r"per-expert statistics do not reproduce.*exclude="):
        KFAC(model).fit([lm_batch()])


def test_experts_and_routers_are_covered_by_every_layer_wise_backend():
    model = small_causal_lm("mixtral", vocab_size=VOCAB, hidden=16)
    fused = {n for n, p in model.named_parameters() if p.dim() == 3}
    routers = {n for n in dict(model.named_parameters()) if n.endswith("mlp.gate.weight")}
    assert len(fused) == 4 and len(routers) == 2
    for backend in ("kfac", "woodfisher", "cg"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing left uncovered
            curvature = build_curvature(backend, model)
        assert fused | routers <= set(curvature.param_names)
        assert len(set(curvature.param_names)) == len(curvature.param_names)
    layers = find_layers(model, exclude=[r"experts\.down_proj\[[13]\]"])
    assert [layer.name for layer in layers if "layers.0.mlp.experts.down" in layer.name] == [
        "model.layers.0.mlp.experts.down_proj[0]", "model.layers.0.mlp.experts.down_proj[2]"]
    assert [layer.name for layer in layers if layer.router] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_a_router_whose_first_output_is_not_its_logits_is_refused():
    model = small_causal_lm("mixtral", vocab_size=VOCAB, hidden=16)
    router = model.model.layers[0].mlp.gate

    class Tempered(type(router)):  # a variant: logits divided by a temperature before they are returned
        def forward(self, hidden_states):
            logits, scores, index = super().forward(hidden_states)
            return logits / 2.0, scores, index

    router.__class__ = Tempered
    with pytest.raises(UserInputError, match=r"router 'model\.layers\.0\.mlp\.gate' does not return "
                                             r"linear\(hidden, weight\).*exclude="):
        KFAC(model).fit([lm_batch()])


def test_cg_runs_grouped_experts_on_eager_for_its_products_and_switches_them_back():
    """transformers' default experts kernel (`grouped_mm`) has no forward-mode AD: CG's products failed on every
    mixture-of-experts model ("Trying to use forward AD with _grouped_mm"). They now switch the experts to eager, like
    the attention, and back; the products are those of a model loaded with eager experts."""
    batch = lm_batch(n=4)
    out = {}
    for implementation in ("grouped_mm", "eager"):
        model = small_causal_lm("mixtral", vocab_size=VOCAB, hidden=16)
        model.set_experts_implementation(implementation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncoveredParametersWarning)
            cg = build_curvature("cg", model, max_iter=5).fit([batch])
        v = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
             for n, p in model.named_parameters() if n in cg.param_names}
        out[implementation] = cg.matvec(v)
        assert model.config._experts_implementation == implementation  # restored after the products
    for name, value in out["eager"].items():
        torch.testing.assert_close(out["grouped_mm"][name], value, rtol=1e-4, atol=1e-6)


def test_full_minus_forget_factors_of_each_expert_are_the_retain_data_factors():
    """A curvature checkpoint minus the forget batches' (`curvature_data="full_minus_forget"`) per expert: the copy
    re-finds each expert's module (it looked the block's name up as a module and failed), and each expert's factors
    are those of the retain batches alone (its own routed-token count subtracted)."""
    from lightning_unlearn.curvature.base import clone_curvature

    model = small_causal_lm("mixtral", vocab_size=VOCAB, hidden=16).double()
    model.set_experts_implementation("eager")
    retain, forget = [lm_batch(seed=0), lm_batch(seed=1)], [lm_batch(seed=2)]
    full = KFAC(model, fisher_type="empirical").fit(retain + forget)
    rest = clone_curvature(full).subtract(KFAC(model, fisher_type="empirical").fit(forget))
    alone = KFAC(model, fisher_type="empirical").fit(retain)
    experts = [layer for layer in rest.layers if layer.expert is not None]
    assert len(experts) == 16 and all(layer.module is model.model.layers[0].mlp.experts for layer in experts[:8])
    for layer in experts + [layer for layer in rest.layers if layer.router]:
        for got, want in zip(rest.factor(layer.name), alone.factor(layer.name)):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_an_experts_module_called_per_sequence_is_refused_by_name():
    """Routed rows must be tokens of the flattened batch: hidden states [batch, length, hidden] would send whole
    sequences to experts (an index error deep inside before)."""
    from lightning_unlearn.curvature.experts import _routing_args  # what routed() reads its calls with

    hidden = torch.zeros(2, 5, 16)
    with pytest.raises(UserInputError, match=r"hidden states \(2, 5, 16\) and routing \(10, 2\).*one row per token"):
        _routing_args((hidden, torch.zeros(10, 2, dtype=torch.long), torch.zeros(10, 2)), {})
