"""Benchmark profiles: which models, batches, dtypes and modes a run covers, and how long it may time each.

A "group" is one (model, batch, dtype, mode): every contender of a group is measured on the same input, in the
same process, interleaved; results are written after each group, so a long profile can be resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
MODES = ("inference", "train")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


@dataclass(frozen=True)
class Group:
    model: str
    batch: int
    dtype: torch.dtype
    mode: str

    def key(self) -> tuple[str, int, str, str]:
        return (self.model, self.batch, dtype_name(self.dtype), self.mode)

    def __str__(self) -> str:
        return f"{self.model} b={self.batch} {dtype_name(self.dtype)} {self.mode}"


@dataclass(frozen=True)
class Profile:
    name: str
    device_type: str
    models: tuple[str, ...]
    batches: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    modes: tuple[str, ...]
    image_size: int = 224
    train_batches: tuple[int, ...] | None = None  # batches of the train groups (None: `batches`)
    # (model, batch) groups that get the torch.compile contenders (None: every group). Compiling costs tens of
    # seconds per model and shape, which small profiles cannot afford everywhere.
    compile_where: tuple[tuple[str, int], ...] | None = None
    compile_train: bool = True  # whether train groups get them too (compiling a training graph costs minutes on CPU)
    max_autotune: bool = False
    graph_replays: bool = False  # GPU inference: CUDA-graph replays of the eager contenders (--graph-replays)
    # CUDA-graph contenders (mode="reduce-overhead") at batch <= small_batch, GPU only (0: never).
    small_batch: int = 0
    # (model, batch) whose unique conv layers are benchmarked one by one, for every dtype of the profile.
    layers: tuple[tuple[str, int], ...] = ()
    max_layer_shapes: int | None = None  # only the first n unique conv shapes (None: all)
    warmup_s: float = 1.0
    seconds_per_group: float = 5.0  # timing budget of a group after warm-up, shared by its contenders
    seconds_per_layer: float = 0.5  # the same for each unique layer shape of the per-layer rows
    min_rounds: int = 5
    max_rounds: int = 50
    max_minutes: float | None = None  # default time budget (see --max-minutes)
    # Only these contenders (and plain eager, the × eager baseline) in every group (empty: all; see --contenders).
    only_contenders: tuple[str, ...] = ()
    note: str = ""

    def groups(self) -> list[Group]:
        """Model by model (so a long run finishes whole models first), then mode, dtype, batch."""
        return [
            Group(model, batch, dtype, mode)
            for model in self.models
            for mode in self.modes
            for dtype in self.dtypes
            for batch in (self.train_batches or self.batches if mode == "train" else self.batches)
        ]

    def compiles(self, group: Group) -> bool:
        if group.mode == "train" and not self.compile_train:
            return False
        return self.compile_where is None or (group.model, group.batch) in self.compile_where

    def with_overrides(self, **changes: object) -> Profile:
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_BF16 = (torch.bfloat16,)

PROFILES = {
    # Tiny shapes, seconds: the CLI smoke test and the CPU dry run of the GPU check.
    "smoke": Profile(
        name="smoke",
        device_type="cpu",
        models=("resnet18",),
        batches=(2,),
        dtypes=(torch.float32,),
        modes=("inference", "train"),
        image_size=64,
        compile_where=(),
        layers=(("resnet18", 2),),
        max_layer_shapes=3,
        warmup_s=0.05,
        seconds_per_group=0.5,
        min_rounds=3,
        max_rounds=5,
        note="smoke profile: 64x64 images and no torch.compile contenders; checks the machinery, not speed",
    ),
    "cpu": Profile(
        name="cpu",
        device_type="cpu",
        models=("resnet18", "resnet50"),
        batches=(1, 4),
        dtypes=(torch.float32,),
        modes=("inference", "train"),
        train_batches=(4,),
        compile_where=(("resnet50", 4),),
        compile_train=False,
        layers=(("resnet18", 1),),
        warmup_s=0.3,
        seconds_per_group=5.0,
        seconds_per_layer=0.3,
        min_rounds=5,
        max_rounds=30,
        max_minutes=4.0,
        note="cpu profile: torch.compile contenders only for resnet50 batch 4 inference (compiling one model at one "
        "batch size costs 15-60 s on 2 cores); training at batch 4; per-layer rows for resnet18 batch 1; 4-minute "
        "budget",
    ),
    "gpu-quick": Profile(
        name="gpu-quick",
        device_type="cuda",
        models=("resnet50",),
        batches=(256, 32),
        dtypes=_BF16,
        modes=("inference", "train"),
        train_batches=(256,),
        compile_where=(("resnet50", 256),),
        small_batch=32,
        layers=(("resnet50", 256),),
        warmup_s=0.5,
        seconds_per_group=4.0,
        seconds_per_layer=0.3,
        min_rounds=10,
        max_rounds=100,
        note="gpu-quick profile: torch.compile default/freezing only at batch 256, CUDA graphs (reduce-overhead) "
        "at batch 32, no max-autotune (its compile alone exceeds the check's time); train at batch 256",
    ),
    "gpu-full": Profile(
        name="gpu-full",
        device_type="cuda",
        models=("resnet18", "resnet50", "resnet101", "resnet152"),
        batches=(1, 32, 256),
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        modes=("inference", "train"),
        max_autotune=True,
        small_batch=32,
        layers=(("resnet18", 256), ("resnet50", 256), ("resnet101", 256), ("resnet152", 256)),
        warmup_s=1.0,
        seconds_per_group=8.0,
        min_rounds=10,
        max_rounds=200,
        note="gpu-full profile: run model by model with --resume; each group is written when done",
    ),
}


def default_profile_name() -> str:
    return "gpu-quick" if torch.cuda.is_available() else "cpu"
