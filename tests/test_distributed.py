"""Data parallelism: `accelerate launch` with 2 gloo processes on CPU gives the single-process adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ofa_kernels.adapters import read_adapter
from ofa_kernels.distributed import Parallel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_shards_cover_the_batch_once():
    for rows in (1, 4, 7, 10):
        for world in range(1, rows + 1):
            parts = [Parallel(r, world).shard(rows) for r in range(world)]
            assert [i for s in parts for i in range(rows)[s]] == list(range(rows))
            assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


@pytest.mark.skipif(not DATA.exists(), reason="shared data not found")
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-lean"])
def test_two_processes_give_the_single_process_adapter(tiny_model_dir, tmp_path, mode):
    arm = "ofa"
    pytest.importorskip("accelerate")
    args = ["adapt", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(DATA), "--shots", "3",
            "--batch-size", "3", "--seeds", "42", "--arm", arm, "--epochs", "4", "--lr", "3e-2", "--test-size", "8",
            "--no-demos"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ofa_kernels.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
              "-m", "ofa_kernels.cli"]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")] + {"ddp": [], "fsdp": ["--fsdp"],
                                                                 "fsdp-lean": ["--fsdp", "--memory-efficient", "on"]}[mode],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data-parallel: 2 processes" in two.stdout
    [one_file], [two_file] = [list((tmp_path / d).glob(f"adapter-sst2-{arm}-seed42-*.safetensors"))
                              for d in ("one", "two")]
    w1, _ = read_adapter(one_file)
    w2, _ = read_adapter(two_file)
    assert set(w1) == set(w2)
    moved = max(float((w1[k] - 1).abs().max()) for k in w1)
    assert moved > 1e-3  # the adapter is not the base: the comparison below means something
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not list((tmp_path / "two").glob("*.tmp"))
    import json

    acc = [json.loads(next((tmp_path / d).glob("results-sst2-*.json")).read_text())["accuracy"][arm]
           for d in ("one", "two")]
    assert acc[0] == acc[1]  # rank 0 (with the sharded model: every rank) evaluated the same weights
