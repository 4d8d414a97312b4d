"""Shared test settings: offline, deterministic, few threads (CI has 2 cores and runs 2 workers)."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Multi-process tests (gloo) of the two xdist workers run at the same time: give each worker its own range of
# rendezvous ports, so that two process groups can never meet on one port (Lightning otherwise picks a free port
# once per worker process and keeps it in MASTER_PORT, and two workers can pick the same one).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_index = int(_worker[2:]) if _worker[2:].isdigit() else 0
os.environ.setdefault("MASTER_PORT", str(29400 + 50 * (_index % 10) + os.getpid() % 50))

import torch  # noqa: E402

torch.set_num_threads(1)
