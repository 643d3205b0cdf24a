"""The shared vocabulary of a run: its options, its result, and the names they take (a leaf module).

``AdaptOptions`` is everything that decides the adapted weights; it is stored with checkpoints and
adapters and names a run (``settings``). Importing it loads neither torch nor the training loop, so
the CLI refuses bad options before anything heavy loads. The names (arms, protocols, estimators,
scoring rules, probe distributions, CUDA-graph modes) live here once; the modules that act on them
import them from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .data import Example

__all__ = ["ARMS", "CUDA_GRAPH_MODES", "DISTRIBUTIONS", "ESTIMATORS", "EXECUTION_ONLY", "KEYED_WHEN_SET",
           "NORM_ARMS", "PEFT_ARMS", "PROBE_ROWS", "check_probe_rows", "PROTOCOLS", "SHARPNESS_FORMS", "SCORING", "SEED_LIMIT", "AdaptOptions", "AdaptResult",
           "check_choice"]


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """``value`` when it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_probe_rows(probe_rows: Any, estimator: str, paper_exact: bool = False) -> str:
    """``probe_rows`` when the estimator can take it (riding rows are the "fd" estimator's, and not the
    authors' all-positions arithmetic), else a ValueError saying which takes what."""
    check_choice("probe_rows", probe_rows, PROBE_ROWS)
    if probe_rows == "last" and estimator != "fd":
        raise ValueError(f'probe_rows="last" rides with the "fd" estimator only; estimator={estimator!r} takes '
                         'probe_rows="all"')
    if probe_rows == "last" and paper_exact:
        raise ValueError('paper_exact reproduces the authors\' all-positions second pass: it takes probe_rows="all"')
    return probe_rows


NORM_ARMS = ("ce", "ce+J", "ce+S", "ofa")  # train the norm weights
PEFT_ARMS = ("lora", "ia3")  # train PEFT adapters (the baselines, ``baselines.py``)
ARMS = NORM_ARMS + PEFT_ARMS
PROTOCOLS = ("paper", "batched")
ESTIMATORS = ("fd", "jvp", "hvp")  # of the sharpness S (``objectives.py``)
SHARPNESS_FORMS = ("trace", "paper", "gain")  # q as a trace, the authors' arithmetic, per unit gain (``objectives.py``)
PROBE_ROWS = ("all", "last")  # "fd": every position perturbed in a second pass, or the last token riding (``riding.py``)
SCORING = ("full", "first")  # a label word's log-probability: all its tokens, or its first (``evaluate.py``)
DISTRIBUTIONS = ("rademacher", "gaussian")  # of the probes (``rng.py``)
CUDA_GRAPH_MODES = ("auto", "on", "off")  # captured steps (``graphs.py``)

EXECUTION_ONLY = ("cuda_graphs", "memory_efficient", "max_memory_gb", "probes_per_pass")
# Fields added after runs were keyed: they enter the key only when set away from their default, so a
# run that does not use them keeps the key it had (and resumes its progress and checkpoints).
KEYED_WHEN_SET = ("j_final_norm_step", "probe_rows", "sharpness_form")
MAX_RANK = 2**16  # LoRA ranks beyond any model's width are refused before a model loads
SEED_LIMIT = 2**63  # seeds are 0 .. 2**63-1: Python's random seeds an int by its absolute value


@dataclass
class AdaptOptions:
    """Everything that decides the adapted weights (stored with checkpoints and adapters)."""

    arm: str = "ofa"
    protocol: str = "paper"  # "paper": one (demonstration, query) pair per step; "batched": one step per epoch
    batch_size: int = 1  # pairs per optimizer step (protocol "paper")
    shots: int = 5
    seed: int = 42
    epochs: int = 60
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup: float = 0.05
    lambda_j: float = 1e-2
    lambda_s: float = 1e-3
    j_final_norm_step: bool = True  # False: J without its last ratio (the step into the final norm's output)
    estimator: str = "fd"
    probe_rows: str = "all"  # "fd" only: "all" positions perturbed in a second pass, or the "last" token riding along
    sharpness_form: str = "trace"  # q as a "trace" estimate, the authors' arithmetic ("paper"), or per unit "gain"
    num_probes: int = 1
    distribution: str = "gaussian"
    eps: float | None = None
    scoring: str = "full"
    rank: int = 1  # LoRA rank (arm "lora")
    memory_efficient: bool | None = None  # checkpointed blocks + split probe pass; None: memory.use_lean_step
    max_memory_gb: float | None = None  # budget that sizes the probe passes (CUDA)
    probes_per_pass: int | None = None  # fixes the split instead of the budget
    fsdp: bool = False  # data-parallel runs: shard the frozen base weights with FSDP2 (else replicate)
    cuda_graphs: str = "auto"  # "auto" | "on" | "off": replay each step from a captured CUDA graph (graphs.py)

    def settings(self) -> dict:
        """The fields that decide the numbers of a run (fingerprints and result keys): all but how the
        steps are executed. ``cuda_graphs``: the same step, replayed (it pads sequences to a bucket,
        which with several sequences per step draws other, equally distributed, probes). The memory
        knobs: checkpointed blocks recompute the same values, and split probe passes add the same
        terms in another order, which moves a weight by at most its last bits, as the thread count
        does (``tests/test_trainer.py`` holds the bound). ``KEYED_WHEN_SET`` fields count only when
        set away from their default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in EXECUTION_ONLY and not (k in KEYED_WHEN_SET and v == defaults[k])}

    def check(self) -> "AdaptOptions":
        """Every field in range (raises ValueError naming it); returns self."""
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        check_choice("sharpness_form", self.sharpness_form, SHARPNESS_FORMS)
        if self.sharpness_form == "paper" and (self.estimator == "hvp" or self.probe_rows != "all"):
            raise ValueError('sharpness_form="paper" is the authors\' all-positions finite difference: it takes '
                             f'estimator "fd" (or "jvp") and probe_rows="all", got estimator={self.estimator!r}, '
                             f'probe_rows={self.probe_rows!r}')
        check_probe_rows(self.probe_rows, self.estimator)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be a whole number from 0 to 2**63-1 (a negative seed would draw the same "
                             f"k-shot set as its absolute value), got {self.seed!r}")
        for name in ("shots", "epochs", "num_probes", "rank", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rank > MAX_RANK:
            raise ValueError(f"rank must be at most {MAX_RANK} (a LoRA rank above a layer's width adds nothing), "
                             f"got {self.rank}")
        if self.probes_per_pass is not None and self.probes_per_pass < 1:
            raise ValueError(f"probes_per_pass must be >= 1, got {self.probes_per_pass}")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise ValueError(f"max_memory_gb must be > 0, got {self.max_memory_gb}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.scoring not in SCORING:
            raise ValueError(f"scoring must be one of {SCORING}, got {self.scoring!r}")
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("weight_decay", "lambda_j", "lambda_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.eps is not None and not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps)
                                         and self.eps > 0):
            raise ValueError(f"eps must be None or a finite number > 0, got {self.eps!r}")
        check_choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        for name in ("memory_efficient", "fsdp", "j_final_norm_step"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "memory_efficient" and value is None):
                raise ValueError(f"{name} must be {'True, False or None' if name == 'memory_efficient' else 'a bool'}"
                                 f", got {value!r}")
        return self


@dataclass
class AdaptResult:
    weights: dict[str, torch.Tensor]  # the trained parameters by name (norms; adapter layers for lora/ia3)
    base_hash: str  # of the base model's norm weights before training
    losses: list[dict[str, float]] = field(default_factory=list)
    train: list[Example] = field(default_factory=list)
    options: AdaptOptions = field(default_factory=AdaptOptions)
