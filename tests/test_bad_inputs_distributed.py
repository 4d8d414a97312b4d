"""Bad input across processes: a process without forget batches, processes with different numbers of batches. Every
process raises the same clear error (not a hang, not "Connection closed by peer" on the others) before any weight
changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from bad_input_fixtures import user_files_untouched  # noqa: F401 - the autouse check of every case
from lightning.fabric import Fabric


def _batch(seed: int) -> dict[str, torch.Tensor]:
    x = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def _attempt(call) -> str:
    """What one process saw of `call()`: "no error", or the error's type and message."""
    try:
        call()
        return "no error"
    except Exception as err:  # noqa: BLE001 - the test records what each rank saw
        return f"{type(err).__name__}: {err}"


def _rank_without_forget(fabric: Fabric, out: Path) -> None:
    from lightning_unlearn.distributed import leave_process_group
    from lightning_unlearn.fabric import fabric_unlearn
    from lightning_unlearn.models import small_causal_lm

    torch.set_num_threads(1)
    batch = _batch(0)
    forget = [batch] if fabric.global_rank == 0 else []  # rank 1's share of the forget set is empty
    message = _attempt(lambda: fabric_unlearn(fabric, small_causal_lm("gpt2", seed=0), forget, [_batch(1)]))
    (out / f"rank{fabric.global_rank}.txt").write_text(message)
    leave_process_group()


def test_a_process_without_forget_batches_fails_the_same_way_on_every_process(tmp_path):
    """Not "Connection closed by peer" on the other process: both raise the same clear error."""
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_rank_without_forget, tmp_path)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1], messages
    assert "UserInputError: fabric_unlearn: process 1 of 2 got no forget batch" in messages[0]
    assert "forget batches per process: [1, 0]" in messages[0]


def _ranks_with_different_batch_counts(fabric: Fabric, out: Path) -> None:
    from lightning_unlearn.distributed import leave_process_group
    from lightning_unlearn.fabric import fabric_unlearn
    from lightning_unlearn.models import small_causal_lm

    torch.set_num_threads(1)
    batch, retain, holdout = _batch(0), _batch(1), _batch(2)  # forget, retain and holdout examples apart
    model = small_causal_lm("gpt2", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = 1 if fabric.global_rank == 0 else 0  # rank 0 has one batch more of the kind under test
    cases = {"forget": dict(forget_loader=[batch] * (1 + extra), retain_loader=[retain] * 2),
             "retain": dict(forget_loader=[batch], retain_loader=[retain] * (2 + extra)),
             "holdout": dict(forget_loader=[batch], retain_loader=[retain] * 2, holdout=[holdout] * (1 + extra))}
    lines = []
    for kind, data in cases.items():
        lines.append(f"{kind}\t{_attempt(lambda data=data: fabric_unlearn(fabric, model, steps=1, **data))}")
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    (out / f"rank{fabric.global_rank}.txt").write_text("\n".join([*lines, f"unchanged\t{unchanged}"]))
    leave_process_group()


def test_processes_with_different_batch_counts_fail_the_same_way_on_every_process(tmp_path):
    """Rank 0 with 2 forget batches and rank 1 with 1 (then retain 3 vs 2, holdout 2 vs 1): each keeps its share of
    its own list, so one of rank 0's batches would never enter the request. Both processes raise the same error,
    naming the kind of data, the counts per process and the fix, before any weight changes."""
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_ranks_with_different_batch_counts, tmp_path)
    ranks = [dict(line.split("\t", 1) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines())
             for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks
    for kind, counts in (("forget", "[2, 1]"), ("retain", "[3, 2]"), ("holdout", "[2, 1]")):
        message = ranks[0][kind]
        assert message.startswith(f"UserInputError: fabric_unlearn: the processes got different numbers of {kind} "
                                  f"batches ({kind} batches per process: {counts})"), message
        assert f"pass the same {kind} batches on every process" in message, message
    assert ranks[0]["unchanged"] == "True"


def _ranks_with_their_own_shards(fabric: Fabric, out: Path) -> None:
    from lightning_unlearn.distributed import leave_process_group
    from lightning_unlearn.fabric import fabric_unlearn
    from lightning_unlearn.models import small_causal_lm

    torch.set_num_threads(1)

    def batch(seed: int) -> dict:
        x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    model = small_causal_lm("gpt2", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rank = fabric.global_rank
    whole = [batch(0), batch(1), batch(2), batch(3)]
    lines = []
    cases = {  # a DistributedSampler's split of the forget set (then of the holdout); the whole set, reordered
        "forget": dict(forget_loader=whole[rank::2], retain_loader=[batch(9)] * 2),
        "holdout": dict(forget_loader=whole[:2], retain_loader=[batch(9)] * 2, holdout=[batch(5 + rank)]),
        "reordered": dict(forget_loader=whole[:2] if rank == 0 else whole[1::-1], retain_loader=[batch(9)] * 2)}
    for kind, data in cases.items():
        target = model if kind != "reordered" else small_causal_lm("gpt2", seed=0)
        lines.append(f"{kind}\t{_attempt(lambda t=target, d=data: fabric_unlearn(fabric, t, steps=1, **d))}")
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    (out / f"rank{rank}.txt").write_text("\n".join([*lines, f"unchanged\t{unchanged}"]))
    leave_process_group()


def test_processes_with_their_own_shard_of_the_forget_set_are_refused_on_every_process(tmp_path):
    """Each process passing its own shard of the forget set (the same number of batches, other examples) kept its
    share of its shard, and half the forget set never entered the request, without a word. Both processes now raise
    the same error before any weight changes; the same examples in another order on each process are fine."""
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_ranks_with_their_own_shards, tmp_path)
    ranks = [dict(line.split("\t", 1) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines())
             for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks
    for kind in ("forget", "holdout"):
        message = ranks[0][kind]
        assert message.startswith(f"UserInputError: fabric_unlearn: the processes got different {kind} examples"), \
            message
        assert "not a DistributedSampler's shard" in message, message
    assert ranks[0]["reordered"] == "no error", ranks[0]["reordered"]
    assert ranks[0]["unchanged"] == "True"
