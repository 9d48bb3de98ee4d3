"""Device detection, the device slug used for baselines, and the benchmark profiles.

A *profile* fixes what is measured on a device: sequence lengths, dtypes, shapes,
rounds, and which variants run at the largest lengths. The CPU profile keeps the whole
suite to a few minutes on a 2-core machine; the CUDA profile goes from 1K to 128K tokens
in float16 and bfloat16.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re

import torch

from perf.options import PASSES  # noqa: F401  (the passes a profile runs)


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the suite measures on one kind of device.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        seq_lens: sequence lengths ``N``.
        dtypes: dtype names (``torch`` attribute names).
        batch, heads, head_dim: ``B``, ``H``, ``D``.
        all_variants_max_n: above this ``N`` only the variants whose ``large_n_devices``
            name this profile's device run (an attribute of each registry variant, so a
            renamed variant keeps its benchmarks).
        full_reference_max_n: up to this ``N`` the error is measured against the full dense
            reference (output and gradients); above it, on sampled query rows of the output.
        warmup_rounds: untimed rounds before timing.
        compiled: registry names also benchmarked through ``torch.compile`` (``<name>+compiled``,
            :mod:`perf.compiled`), at the lengths where the eager variant runs.
        compile_mode: the ``torch.compile`` mode of those (``reduce-overhead``: CUDA graphs).
        threads: ``torch.set_num_threads`` for the run (``None``: torch's default). The CPU
            profile runs on one thread: intra-op parallel regions wait for their slowest
            thread, so on a 2-core machine one busy neighbouring process slowed a
            two-thread run 2.4x, and unevenly (many small kernels suffer more than one
            large SDPA call): even the ratio to SDPA moved by up to +400%.
        real_ranks_n, real_ranks, real_ranks_rounds: the rows of ``python -m perf --real-ranks``
            (:mod:`perf.real_ranks`): sequence lengths, ring sizes ``R`` (one process per rank)
            and timed rounds.
    """

    device: str
    seq_lens: tuple[int, ...]
    dtypes: tuple[str, ...]
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    all_variants_max_n: int = 2048
    full_reference_max_n: int = 1024
    warmup_rounds: int = 1
    compiled: tuple[str, ...] = ()
    compile_mode: str = "default"
    threads: int | None = None
    real_ranks_n: tuple[int, ...] = (4096,)
    real_ranks: tuple[int, ...] = (2, 4)
    real_ranks_rounds: int = 3

    def rounds(self, seq_len: int) -> int:
        """Timed rounds at ``seq_len``: fewer at the expensive lengths."""
        if self.device == "cuda":
            return 10 if seq_len <= 16384 else 5 if seq_len <= 65536 else 3
        return 7 if seq_len <= 1024 else 5 if seq_len <= 2048 else 3

    def variants_at(self, seq_len: int, variants) -> list[str]:
        """Names of the ``variants`` (registry ``Variant`` objects) that run at ``seq_len``."""
        return [v.name for v in variants
                if seq_len <= self.all_variants_max_n or self.device in v.large_n_devices]


CPU_PROFILE = Profile(
    device="cpu",
    seq_lens=(1024, 2048, 4096),
    dtypes=("float32",),
    all_variants_max_n=2048,
    warmup_rounds=1,
    threads=1,
)

CUDA_PROFILE = Profile(
    device="cuda",
    seq_lens=(1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
    dtypes=("float16", "bfloat16"),
    all_variants_max_n=16384,
    full_reference_max_n=1024,
    warmup_rounds=2,
    # the most launch-bound single-device and ring variants (python -m perf.counters)
    compiled=("longnet", "ring-zigzag-causal4"),
    compile_mode="reduce-overhead",
    real_ranks_n=(16384,),
    real_ranks=(2, 4, 8),  # NCCL: the sizes with a GPU per rank run, the others skip
    real_ranks_rounds=5,
)


def pick_device(requested: str = "auto") -> str:
    """``"cuda"`` when asked for or available (``auto``), else ``"cpu"``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--perf-device cuda asked for, but torch.cuda.is_available() is False")
    return requested


def profile_for(device: str) -> Profile:
    return CUDA_PROFILE if device == "cuda" else CPU_PROFILE


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU model, precise enough that two machines sharing it time the suite alike.

    Linux's ``model name`` alone can be too coarse: virtual machines report "AMD EPYC" for
    generations whose speed differs threefold (seen on this project's CI hosts), so the
    family and model numbers follow it where ``/proc/cpuinfo`` has them. Elsewhere:
    ``platform.processor()``, or the architecture.
    """
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def device_name(device: str) -> str:
    """Human-readable name: the GPU's name, or the CPU model and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"{cpu_model()}, {os.cpu_count()} cores"


def device_slug(device: str) -> str:
    """Baseline folder name, one per kind of device whose timings compare.

    ``cuda-nvidia-h100-80gb-hbm3`` (pytest-benchmark's own key names no GPU), or, on CPU, the
    architecture, CPU model and core count: ``cpu-x86_64-amd-epyc-family-26-model-2-2cores``.
    """
    if device == "cuda":
        return "cuda-" + slugify(torch.cuda.get_device_name(torch.cuda.current_device()))
    arch = slugify(platform.machine()).replace("-", "_")
    return f"cpu-{arch}-{slugify(cpu_model())}-{os.cpu_count()}cores"
