"""The shared vocabulary of a run: its options, its result, and the names they take (the application's leaf:
it reads only the kernel floor's torch-free ``vocab``).

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

from ..vocab import DISTRIBUTIONS, check_choice  # the kernel floor's names (probes)

if TYPE_CHECKING:
    import torch

    from .data import Example

__all__ = ["ARMS", "CUDA_GRAPH_MODES", "DISTRIBUTIONS", "ESTIMATORS", "EXECUTION_ONLY", "KEYED_WHEN_SET",
           "NORM_ARMS", "PEFT_ARMS", "PROBE_ROWS", "check_probe_rows", "PROTOCOLS", "SHARPNESS_FORMS", "SCORING", "SEED_LIMIT", "AdaptOptions", "AdaptResult",
           "check_choice", "option"]


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
CUDA_GRAPH_MODES = ("auto", "on", "off")  # captured steps (``graphs.py``)

EXECUTION_ONLY = ("cuda_graphs", "memory_efficient", "max_memory_gb", "probes_per_pass")
# Fields added after runs were keyed, with the value every run had before the field existed: a field enters
# the key only away from that value, so a run that does not use it keeps the key it had (and resumes its
# progress and checkpoints). The value is fixed here, not read from the default: were a default to change,
# a run under the new default must not take an old run's key.
KEYED_WHEN_SET = {"j_final_norm_step": True, "probe_rows": "all", "sharpness_form": "trace"}
MAX_RANK = 2**16  # LoRA ranks beyond any model's width are refused before a model loads
SEED_LIMIT = 2**63  # seeds are 0 .. 2**63-1: Python's random seeds an int by its absolute value


def option(default: Any, help: str, *, choices: tuple | dict | None = None, flag: str | None = None,
           parse: str | None = None, switch: bool | None = None, per_run: bool = False,
           cli_default: Any = None) -> Any:
    """An ``AdaptOptions`` field with what its ``ofa adapt`` flag is made of (``cli.add_option_flags``):
    ``help``; ``choices`` (a tuple, or a dict from the words typed to the values); ``flag`` (default
    ``--name-with-dashes``); ``parse``, the name of the CLI's parser of the text ("positive_int",
    "positive_float", "nonnegative_float", "fraction", "seeds", "arms"); ``switch``, for a bool
    given as a bare flag, the value the flag sets; ``per_run`` for the fields a list of runs varies (one
    flag names several values); ``cli_default`` where the flag's default text differs from ``default``."""
    metadata = {"help": help, "choices": choices, "flag": flag, "parse": parse, "switch": switch,
                "per_run": per_run, "cli_default": cli_default}
    return field(default=default, metadata=metadata)


@dataclass
class AdaptOptions:
    """Everything that decides the adapted weights (stored with checkpoints and adapters). Each field
    carries its ``ofa adapt`` flag's help, choices and parser (``option``); the CLI is made from them."""

    arm: str = option("ofa", "ce, ce+J, ce+S, ofa (norm tuning) or the PEFT baselines lora, ia3; comma-separated "
                      "for several", parse="arms", per_run=True)
    protocol: str = option("paper", "paper (the authors': shuffled disjoint (demonstration, query) pairs, "
                           "one pair per optimizer step) or batched (every example a query, one step per epoch)",
                           choices=PROTOCOLS)
    batch_size: int = option(1, "pairs per optimizer step (protocol paper)", parse="positive_int")
    shots: int = option(5, "examples per class", parse="positive_int")
    seed: int = option(42, "comma-separated seeds: each draws its k-shot set and trains once", flag="--seeds",
                       parse="seeds", per_run=True, cli_default="42,43,44,45,46")
    epochs: int = option(60, "passes over the k-shot set (the authors': 60)", parse="positive_int")
    lr: float = option(1e-3, "AdamW learning rate", parse="positive_float")
    weight_decay: float = option(1e-3, "AdamW weight decay", parse="nonnegative_float")
    warmup: float = option(0.05, "the fraction of steps the learning rate warms up over",
                           parse="fraction")
    lambda_j: float = option(1e-2, "weight of the step ratio J", parse="nonnegative_float")
    lambda_s: float = option(1e-3, "weight of the sharpness S", parse="nonnegative_float")
    j_final_norm_step: bool = option(True, "J without its last ratio, the step into the final norm's output "
                                     "(default: the paper's J)", flag="--j-without-final-norm", switch=False)
    estimator: str = option("fd", "sharpness estimator", choices=ESTIMATORS)
    probe_rows: str | None = option(None, '"fd" sharpness: perturb every position in a second pass (all), or only '
                                    "the last prompt token, riding as an extra row of the one pass (last: about the "
                                    'cost of a CE step); auto: last for the "fd" estimator\'s trace and gain forms, all '
                                    "otherwise", choices={"auto": None, **{rows: rows for rows in PROBE_ROWS}})
    sharpness_form: str = option("gain", "S's q: a trace estimate (trace), the authors' arithmetic (paper: eps "
                                 "times the trace, their noise and pairs), or the trace per unit of gain (gain: the "
                                 "same weight on every model)", choices=SHARPNESS_FORMS)
    num_probes: int = option(1, "sharpness probes per step", flag="--probes", parse="positive_int")
    distribution: str = option("gaussian", "the probes' distribution (the authors': gaussian)",
                               choices=DISTRIBUTIONS)
    eps: float | None = option(None, "the sharpness finite-difference step (default: 1e-3, or 2**-5 times the "
                               "row's RMS for bf16/fp16 models)", parse="positive_float")
    scoring: str = option("full", "full (the whole label word) or first (its first sub-token)", choices=SCORING)
    rank: int = option(1, "LoRA rank (arm lora)", parse="positive_int")
    memory_efficient: bool | None = option(None, "checkpointed blocks + split probe pass (auto: on CUDA for >= 1024 "
                                           "tokens per step)", choices={"auto": None, "on": True, "off": False})
    max_memory_gb: float | None = option(None, "GiB budget for a CUDA training step (splits the probe pass; turns "
                                         "on the memory-efficient step)", flag="--max-memory", parse="positive_float")
    probes_per_pass: int | None = option(None, "probes per probe pass (fixes the split instead of --max-memory)",
                                         parse="positive_int")
    fsdp: bool = option(False, "with accelerate launch: shard the frozen base weights (FSDP2) instead of "
                        "replicating them", switch=True)
    cuda_graphs: str = option("auto", "replay each training step from a CUDA graph captured per sequence-length "
                              "bucket (auto: on CUDA in one process, falling back to eager steps with one line if "
                              "capture fails)", choices=CUDA_GRAPH_MODES)

    def settings(self) -> dict:
        """The fields that decide the numbers of a run (fingerprints and result keys): all but how the
        steps are executed. ``cuda_graphs``: the same step, replayed (it pads sequences to a bucket,
        which with several sequences per step draws other, equally distributed, probes). The memory
        knobs: checkpointed blocks recompute the same values, and split probe passes add the same
        terms in another order, which moves a weight by at most its last bits, as the thread count
        does (``tests/test_trainer.py`` holds the bound). ``KEYED_WHEN_SET`` fields count only when
        set away from the value runs had before them; ``probe_rows`` counts as it runs (``resolved``)."""
        return {k: v for k, v in dataclasses.asdict(self.resolved()).items()
                if k not in EXECUTION_ONLY and not (k in KEYED_WHEN_SET and v == KEYED_WHEN_SET[k])}

    def resolved(self) -> "AdaptOptions":
        """These options as the step runs them (``probe_rows`` auto made explicit: ``rows()``): what the run
        key, results files and adapters record."""
        return dataclasses.replace(self, probe_rows=self.rows())

    def rows(self) -> str:
        """``probe_rows`` as the step runs it: the field, or where it is None (auto) "last" for the "fd"
        estimator's trace and gain forms and "all" otherwise (the authors' form and the "jvp" and "hvp"
        estimators perturb every position)."""
        if self.probe_rows is not None:
            return self.probe_rows
        return "last" if self.estimator == "fd" and self.sharpness_form != "paper" else "all"

    def check(self) -> "AdaptOptions":
        """Every field in range (raises ValueError naming it); returns self."""
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        check_choice("sharpness_form", self.sharpness_form, SHARPNESS_FORMS)
        if self.sharpness_form == "paper" and (self.estimator == "hvp" or self.rows() != "all"):
            raise ValueError('sharpness_form="paper" is the authors\' all-positions finite difference: it takes '
                             f'estimator "fd" (or "jvp") and probe_rows="all", got estimator={self.estimator!r}, '
                             f'probe_rows={self.probe_rows!r}')
        check_probe_rows(self.rows(), self.estimator)
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
