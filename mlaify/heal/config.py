"""`HealConfig`: what a healing run trains, on how many tokens, and how (each field is one CLI flag)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from transformers.trainer_utils import SchedulerType

from ..devices import DEVICES
from ..errors import MlaifyError

# Which parameters learn. The cache content `kv_a_proj_with_mqa` learns in every set: training
# changes what it writes, never how much.
TRAIN_SETS = ("attention", "attention+norms", "all")
LOSSES = ("kd", "lm", "kd+lm")
COMPUTE_DTYPES = ("bfloat16", "float32")
SCHEDULES = tuple(s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy"))


@dataclass
class HealConfig:
    """A distillation run of a converted (student) model toward its source (teacher)."""

    tokens: int = (
        1_000_000  # end-to-end training tokens (steps x batch x accum x seq_len); 0: block-wise only
    )
    seq_len: int = 512  # the calibration windows' length; longer windows cost more per token
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.05  # fraction of the optimizer steps
    schedule: str = "cosine"
    # Defaults from benchmarks/results/heal_methods.md (SmolLM2 -75%, 32k tokens): kd+lm beat kd, lm,
    # and every parameter set reached about the same perplexity, attention the fastest per token.
    train: str = "attention"
    loss: str = "kd+lm"
    temperature: float = 1.0  # of the KL term; the T^2 factor keeps its gradient scale (Hinton et al. 2015)
    hidden_weight: float = 0.0  # of the per-layer hidden-state term beside the loss (distill.py; 0: off)
    weight_decay: float = 0.0
    eval_every: int = 0  # tokens between evaluations of the eval text (0: only at the start and the end)
    eval_at: tuple[int, ...] = field(default_factory=tuple)  # further token counts to evaluate at
    eval_windows: int = 4  # first windows of the eval text, as the reference perplexity protocol reads it
    eval_seq_len: int = 2048
    save_every: int = 0  # tokens between resumable checkpoints (0: none)
    seed: int = 0
    device: str = "auto"
    # Autocast of the forward passes (student and teacher); the weights and optimizer stay float32.
    compute_dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    # Block-wise stage first (blockwise.py): every attention on the first N training windows, a layer
    # at a time, `blockwise_epochs` passes of Adam at `blockwise_lr` (0 windows: no such stage).
    blockwise_windows: int = 0
    blockwise_epochs: int = 2
    blockwise_lr: float = 1e-4

    def __post_init__(self) -> None:
        choices = {
            "train": TRAIN_SETS,
            "loss": LOSSES,
            "schedule": SCHEDULES,
            "compute_dtype": COMPUTE_DTYPES,
            "device": DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MlaifyError(
                    f"unknown heal {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "eval_windows",
            "eval_seq_len",
            "blockwise_epochs",
        ):
            if getattr(self, name) < 1:
                raise MlaifyError(f"heal {name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "tokens",
            "eval_every",
            "save_every",
            "weight_decay",
            "blockwise_windows",
            "hidden_weight",
        ):
            if getattr(self, name) < 0:
                raise MlaifyError(f"heal {name} must be >= 0, got {getattr(self, name)}")
        if min(self.lr, self.temperature, self.blockwise_lr) <= 0:
            raise MlaifyError(
                f"heal lr, blockwise_lr and temperature must be > 0, got {self.lr}, {self.blockwise_lr} "
                f"and {self.temperature}"
            )
        if self.tokens == 0 and self.blockwise_windows == 0:
            raise MlaifyError("--tokens 0 trains nothing; give --tokens N, or --blockwise-windows N alone")
        if not 0 <= self.warmup < 1:
            raise MlaifyError(f"heal warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        self.eval_at = tuple(sorted(int(t) for t in self.eval_at))
        if 0 < self.tokens < self.tokens_per_step:
            raise MlaifyError(
                f"--tokens {self.tokens} is less than one optimizer step of {self.tokens_per_step} tokens "
                f"(seq_len {self.seq_len} x batch {self.batch_size} x accum {self.grad_accum}); "
                "raise --tokens or lower --seq-len, --batch-size or --grad-accum"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one process (Trainer multiplies the batch by the world size)."""
        return self.seq_len * self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return {**asdict(self), "eval_at": list(self.eval_at)}
