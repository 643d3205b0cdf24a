"""A rank of a sharded (FSDP2) OFA run for tests/test_distributed.py, launched by torchrun.

    fsdp_resume.py MODEL_DIR DATA_DIR OUT_FILE [CHECKPOINT [STOP_AFTER]]

Loads MODEL_DIR into this rank's shards, adapts on sst2 (checkpointing into CHECKPOINT, ending after
STOP_AFTER optimizer steps as a killed run would), and rank 0 writes the weights and losses to OUT_FILE.
"""

import faulthandler
import sys

import torch

from ofa_kernels.fewshot import data
from ofa_kernels.fewshot.distributed import finish, is_main_process
from ofa_kernels.fewshot.models import load_model
from ofa_kernels.fewshot.trainer import AdaptOptions, adapt


def main(model_dir: str, data_dir: str, out: str, checkpoint: str | None, stop_after: int | None) -> None:
    model, tokenizer = load_model(model_dir, torch.float32, "cpu", sharded=True)
    dataset = data.load_task("sst2", data_dir)
    options = AdaptOptions(arm="ofa", shots=4, batch_size=2, epochs=4, lr=3e-2, fsdp=True, seed=42)
    result = adapt(model, tokenizer, dataset, options, checkpoint=checkpoint, checkpoint_every=3,
                   stop_after=stop_after)
    if is_main_process():
        torch.save({"weights": result.weights, "losses": result.losses}, out)


if __name__ == "__main__":
    faulthandler.enable()  # a rank that aborts prints where every thread was
    main(*sys.argv[1:4], sys.argv[4] if len(sys.argv) > 4 else None,
         int(sys.argv[5]) if len(sys.argv) > 5 else None)
    finish()
