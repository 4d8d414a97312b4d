"""Signals to the command: SIGTERM during a run exits 143 and leaves no output that looks complete; Ctrl-C raises
through `finally` blocks and exits 130. The user's source model and training data stay byte-for-byte unchanged (the
autouse `user_files_untouched` check).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from bad_input_fixtures import (
    ENDLESS,
    make_project,
    user_files_untouched,  # noqa: F401 - the autouse check of every case
)

from lightning_unlearn.errors import EXIT_SIGTERM
from lightning_unlearn.io import write_manifest


@pytest.fixture(scope="module")
def cmd_project(tmp_path_factory):
    """One user's project for every case that does not change it."""
    return make_project(tmp_path_factory.mktemp("user"))


def test_sigterm_exits_143_and_leaves_no_output_that_looks_complete(cmd_project):
    """A real process and a real SIGTERM once the run has started (its `finished: false` marker is there)."""
    before = cmd_project.snapshot()
    output = cmd_project.root / "older_output"
    shutil.copytree(cmd_project.model, output)  # an older output of ours: a model and its run.json
    write_manifest(output, command="fit", status="target_reached", finished=True, exit_code=0)
    old = (output / "model.safetensors").read_bytes()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "LIGHTNING_UNLEARN_LOG_DIR": str(cmd_project.root / "sigterm_logs")}
    cmd = [sys.executable, "-m", "lightning_unlearn.cli", "fit", "--config", str(cmd_project.config), "--output",
           str(output), "--overwrite", *ENDLESS]
    proc = subprocess.Popen(cmd, cwd=cmd_project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if json.loads((output / "run.json").read_text()).get("status") == "running":
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)  # well inside the fit
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    manifest = json.loads((output / "run.json").read_text())
    assert manifest["finished"] is False and manifest["status"] == "interrupted"
    assert (output / "model.safetensors").read_bytes() == old  # the older model, marked as not this run's
    assert not [p for p in cmd_project.root.iterdir() if p.name.startswith(".older_output")], "temporary folder left"
    # the run's logs are removed with it (wandb's service may still be writing its own files: not checked)
    assert not [p for p in (cmd_project.root / "sigterm_logs").rglob("*") if p.name in ("config.yaml", "hparams.yaml",
                                                                                 "metrics.csv")]
    assert cmd_project.snapshot() == before



def test_ctrl_c_raises_through_finally_blocks_and_exits_130():
    from lightning_unlearn.cli.signals import Interrupted
    from lightning_unlearn.cli.signals import install_signal_handlers as _install_signal_handlers

    previous = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    restore = _install_signal_handlers()
    cleaned = []
    try:
        with pytest.raises(Interrupted) as info:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:
                cleaned.append(True)
    finally:
        restore()
    assert info.value.code == 130 and cleaned == [True]
    assert signal.getsignal(signal.SIGINT) is previous  # the handler from before is back
