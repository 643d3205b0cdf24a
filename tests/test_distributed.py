"""Data parallelism: `accelerate launch` with 2 gloo processes on CPU gives the single-process adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TASKS
import torch

from ofa_kernels.fewshot.adapters import read_adapter
from ofa_kernels.fewshot.distributed import Parallel



def test_shards_cover_the_batch_once():
    for rows in (1, 4, 7, 10):
        for world in range(1, rows + 1):
            parts = [Parallel(r, world).shard(rows) for r in range(world)]
            assert [i for s in parts for i in range(rows)[s]] == list(range(rows))
            assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


@pytest.fixture(scope="module")
def sharded_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama saved as sharded safetensors (model-0000x-of-0000y + index), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-sharded")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(folder, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    return folder


def _free_port() -> int:
    """A TCP port nothing listens on now (tests run in parallel workers: no two launches share a fixed one)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(processes: int, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_NOISE = ("returned a view tensor", "self._register_pre_backward_hook(output)")  # FSDP2's warning on every forward


def _errors(stderr: str, chars: int = 6000) -> str:
    """The end of a launch's stderr without FSDP2's per-forward warning, which buries the error."""
    return "\n".join(line for line in stderr.splitlines() if not any(n in line for n in _NOISE))[-chars:]


@pytest.mark.parametrize("mode,processes", [("ddp", 2), ("fsdp", 2), ("fsdp-lean", 2), ("fsdp", 4), ("ddp-last", 2)])
def test_several_processes_give_the_single_process_adapter(sharded_model_dir, tmp_path, mode, processes):
    """--fsdp loads each rank's shards straight from the sharded safetensors (meta device), so this also
    checks that sharded loading gives the model the single process loads. "ddp-last": the probes ride in
    the clean pass (--probe-rows last), each rank's riders numbered by their rows in the whole batch."""
    arm = "ofa"
    pytest.importorskip("accelerate")
    args = ["adapt", "--model", str(sharded_model_dir), "--task", "sst2", "--data-dir", str(TASKS), "--shots", "4",
            "--batch-size", "4", "--seeds", "42", "--arm", arm, "--epochs", "3", "--lr", "3e-2", "--test-size", "8",
            "--no-demos", *(["--probe-rows", "last"] if mode.endswith("-last") else [])]
    one = subprocess.run([sys.executable, "-m", "ofa_kernels.fewshot.cli", *args, "--out", str(tmp_path / "one")], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, _errors(one.stderr)
    flags = {"ddp": [], "ddp-last": [], "fsdp": ["--fsdp"], "fsdp-lean": ["--fsdp", "--memory-efficient", "on"]}[mode]
    many = subprocess.run([*_launch(processes, _free_port()), "-m", "ofa_kernels.fewshot.cli", *args, "--out", str(tmp_path / "many"),
                           *flags], env=ENV, capture_output=True, text=True, timeout=600)
    assert many.returncode == 0, _errors(many.stderr)
    assert f"data-parallel: {processes} processes" in many.stdout
    [one_file], [many_file] = [list((tmp_path / d).glob(f"adapter-sst2-{arm}-seed42-*.safetensors"))
                               for d in ("one", "many")]
    w1, _ = read_adapter(one_file)
    w2, _ = read_adapter(many_file)
    assert set(w1) == set(w2)
    moved = max(float((w1[k] - 1).abs().max()) for k in w1)
    assert moved > 1e-3  # the adapter is not the base: the comparison below means something
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not list((tmp_path / "many").glob("*.tmp")) and not list((tmp_path / "many").glob("checkpoint-*"))
    import json

    results = [json.loads(next((tmp_path / d).glob("results-sst2-*.json")).read_text()) for d in ("one", "many")]
    for row in ("zero-shot", "ICL", arm):  # rank 0 (with the sharded model: every rank) evaluated the same weights
        assert results[0]["accuracy"][row] == results[1]["accuracy"][row], row


def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_weights(sharded_model_dir, tmp_path):
    worker = Path(__file__).parent / "workers" / "fsdp_resume.py"

    def run(*extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(worker), str(sharded_model_dir), str(TASKS), *extra]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{extra[0]} written: {Path(extra[0]).exists()}\n{_errors(done.stderr)}"

    ckpt = tmp_path / "checkpoint.dcp"
    run(str(tmp_path / "whole.pt"))
    run(str(tmp_path / "killed.pt"), str(ckpt), "5")  # 8 steps in all; stops after step 5, the last checkpoint at 3
    assert ckpt.is_dir() and (ckpt / ".metadata").exists()
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == 3
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.old"))
    run(str(tmp_path / "resumed.pt"), str(ckpt))
    whole, killed, resumed = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("whole", "killed", "resumed"))
    assert len(killed["losses"]) == 5 and len(resumed["losses"]) == len(whole["losses"]) == 8
    assert any(not torch.equal(killed["weights"][k], whole["weights"][k]) for k in whole["weights"])
    for k, w in whole["weights"].items():
        torch.testing.assert_close(resumed["weights"][k], w, rtol=1e-6, atol=1e-7, msg=k)
    for a, b in zip(resumed["losses"], whole["losses"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_sharded_loading_holds_each_ranks_share_not_the_whole_model(tmp_path):
    """Each rank's peak resident memory while loading stays below its share plus 10% of the model."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fsdp_loading

    size = fsdp_loading.make_model(tmp_path / "model")
    assert size > 400e6  # large enough that the share, not the process's own overhead, decides the check
    for ranks in (2, 4):
        for rank in fsdp_loading.measure(tmp_path / "model", "meta", ranks, _free_port()):
            assert rank["peak_above_start"] < (1 / ranks + 0.1) * size, (ranks, rank)
            assert rank["parameter_bytes"] < (1 / ranks + 0.02) * size, (ranks, rank)
