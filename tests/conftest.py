"""Shared test settings: offline, deterministic, few threads (CI has 2 cores and runs 2 workers)."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The package, imported once here, in pytest-xdist's controller too: the controller imports the module of each warning
# class a worker reports, from one receiving thread per worker, so two workers' first warnings imported the package
# from two threads at once and Python's import-deadlock guard handed one of them a partially initialised module
# ("cannot import name ... from partially initialized module": an INTERNALERROR that ended the run).
import lightning_unlearn.callbacks  # noqa: E402, F401
import lightning_unlearn.cli.config  # noqa: E402, F401
import lightning_unlearn.data  # noqa: E402, F401
import lightning_unlearn.evaluate_command  # noqa: E402, F401
import lightning_unlearn.fabric  # noqa: E402, F401
import lightning_unlearn.metrics  # noqa: E402, F401
import lightning_unlearn.module  # noqa: E402, F401


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread: Lightning's launchers set `torch.set_num_threads(cpus // processes)` when a
    run starts in-process (a ModelParallelStrategy fit, a Fabric launch), and a test after one in the same worker
    then trained its models with 2 threads: other floating-point sums, another model (the lines fixture's Llama
    memorised its forget lines to 0.369 nats instead of 0.256), so a test's outcome depended on the test order."""
    torch.set_num_threads(1)
    yield
