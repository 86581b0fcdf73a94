"""FSDP2 (fully_shard) code paths on 2 CPU processes: sharded EMA, gathered checkpoints, resume on any count."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from cosmos_t2i.pipeline import load_dit


def launch(n, *args, port):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                             "--master_port", str(port), "tests/fsdp_worker.py", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process on Linux")
def test_fsdp_matches_one_process_and_resumes_on_another_count(tiny_bundle, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, tiny_bundle, one, 2, port=29611)
    launch(2, tiny_bundle, two, 2, port=29612)
    a, b = json.loads((one / "losses.json").read_text()), json.loads((two / "losses.json").read_text())
    assert all(abs(x - y) < 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    ma, mb = torch.load(one / "model.pt", weights_only=True), torch.load(two / "model.pt", weights_only=True)
    assert ma.keys() == mb.keys() and any(k.startswith("net_ema.") for k in ma)
    for k in ma:  # gathered from shards: full shapes, same values
        torch.testing.assert_close(ma[k].float(), mb[k].float(), rtol=1e-5, atol=1e-5)
    # the file written from sharded state loads in one process for inference
    model = load_dit(str(two / "model.pt"), load_ema=True, dtype=torch.float32)
    assert model.transformer_blocks[0].attn1.to_q.weight.shape == (32, 32)

    # resume the 2-process checkpoint on 1 process and the 1-process checkpoint on 2: the same next step
    launch(1, tiny_bundle, tmp_path / "two_then_one", 1, two, port=29613)
    launch(2, tiny_bundle, tmp_path / "one_then_two", 1, one, port=29614)
    ra = torch.load(tmp_path / "two_then_one" / "optim.pt", weights_only=True)
    rb = torch.load(tmp_path / "one_then_two" / "optim.pt", weights_only=True)
    assert ra["iteration"] == rb["iteration"] == 3
    for k in ra["master_weights"]:
        torch.testing.assert_close(ra["master_weights"][k], rb["master_weights"][k], rtol=1e-5, atol=1e-5)
