"""What a CPU offers llama.cpp, and which of its CPU kernel variants fits it best.

A portable build carries llama.cpp's CPU kernels compiled once per instruction-set level
(``libggml-cpu-haswell.so``, ``-skylakex``, ``-sapphirerapids`` …). ``VARIANTS`` mirrors the
levels and scores of the llama.cpp rbee builds (``ggml/src/CMakeLists.txt`` and
``ggml-cpu/arch/*/cpu-feats.cpp``), so a decision made here from ``/proc/cpuinfo`` (or macOS's
``sysctl``) is the one llama.cpp would make from ``cpuid``, and ``fleet plan`` can show it for a
host rbee has not installed yet. What the CPU *advertises* is only the first cut: a variant is
kept only after it decoded for real on the host (``proof``).

Pure functions of text: unit-tested on captures of real machines.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

#: llama.cpp's feature names → the ``/proc/cpuinfo`` flags that must all be there
X86_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
    "AMX_BF16": ("amx_bf16",),
}
ARM_FLAGS: dict[str, tuple[str, ...]] = {
    "DOTPROD": ("asimddp",),
    "FP16_VECTOR_ARITHMETIC": ("asimdhp",),
    "SVE": ("sve",),
    "MATMUL_INT8": ("i8mm",),
    "SVE2": ("sve2",),
    "SME": ("sme",),
}
#: macOS ``sysctl hw.optional.arm.FEAT_*`` → llama.cpp's names
MAC_FLAGS = {"FEAT_DotProd": "DOTPROD", "FEAT_FP16": "FP16_VECTOR_ARITHMETIC", "FEAT_I8MM": "MATMUL_INT8",
             "FEAT_SME": "SME"}

#: each feature's weight in llama.cpp's variant score (``ggml_backend_cpu_*_score``); AMX_TILE
#: counts nothing there, but its variant is compiled with it, so it is required all the same
SCORE = {
    "FMA": 1, "F16C": 2, "SSE42": 4, "BMI2": 8, "AVX": 16, "AVX2": 32, "AVX_VNNI": 64, "AVX512": 128,
    "AVX512_VBMI": 256, "AVX512_BF16": 512, "AVX512_VNNI": 1024, "AMX_INT8": 2048, "AMX_TILE": 0,
    "DOTPROD": 2, "FP16_VECTOR_ARITHMETIC": 4, "SVE": 8, "MATMUL_INT8": 16, "SVE2": 32, "SME": 64,
}


@dataclass(frozen=True)
class Variant:
    name: str
    needs: tuple[str, ...]

    @property
    def score(self) -> int:
        return 1 + sum(SCORE[need] for need in self.needs)


def _variants(*rows: str) -> tuple[Variant, ...]:
    return tuple(Variant(row.split()[0], tuple(row.split()[1:])) for row in rows)


_HASWELL = "SSE42 AVX F16C FMA AVX2 BMI2"
_AVX512 = f"{_HASWELL} AVX512"
VARIANTS: dict[str, tuple[Variant, ...]] = {
    "x86_64": _variants(
        "x64", "sse42 SSE42", "sandybridge SSE42 AVX", "ivybridge SSE42 AVX F16C", "piledriver SSE42 AVX F16C FMA",
        f"haswell {_HASWELL}", f"skylakex {_AVX512}", f"cannonlake {_AVX512} AVX512_VBMI",
        f"cascadelake {_AVX512} AVX512_VNNI", f"icelake {_AVX512} AVX512_VBMI AVX512_VNNI",
        f"cooperlake {_AVX512} AVX512_VNNI AVX512_BF16", f"zen4 {_AVX512} AVX512_VBMI AVX512_VNNI AVX512_BF16",
        f"alderlake {_HASWELL} AVX_VNNI",
        f"sapphirerapids {_AVX512} AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8",
    ),
    "aarch64": _variants(
        "armv8.0_1", "armv8.2_1 DOTPROD", "armv8.2_2 DOTPROD FP16_VECTOR_ARITHMETIC",
        "armv8.2_3 DOTPROD FP16_VECTOR_ARITHMETIC SVE", "armv8.6_1 DOTPROD FP16_VECTOR_ARITHMETIC SVE MATMUL_INT8",
        "armv8.6_2 DOTPROD FP16_VECTOR_ARITHMETIC SVE MATMUL_INT8 SVE2",
        "armv9.2_1 DOTPROD FP16_VECTOR_ARITHMETIC SVE MATMUL_INT8 SME",
        "armv9.2_2 DOTPROD FP16_VECTOR_ARITHMETIC SVE MATMUL_INT8 SVE2 SME",
    ),
    "darwin-arm64": _variants("apple_m1 DOTPROD", "apple_m2_m3 DOTPROD MATMUL_INT8",
                              "apple_m4 DOTPROD MATMUL_INT8 SME"),
}


@dataclass(frozen=True)
class Cpu:
    """One host's CPU as llama.cpp sees it."""

    system: str  # linux | darwin
    machine: str  # x86_64 | aarch64 | arm64
    model: str
    features: frozenset[str]  # llama.cpp's names: AVX2, AVX512, AMX_INT8, DOTPROD, …

    @property
    def family(self) -> str:
        """Which variant table applies."""
        if self.machine in ("x86_64", "amd64"):
            return "x86_64"
        if self.machine in ("arm64", "aarch64"):
            return "darwin-arm64" if self.system == "darwin" else "aarch64"
        return self.machine

    def runs(self, variant: Variant) -> bool:
        return set(variant.needs) <= self.features

    def summary(self) -> str:
        """The features that decide llama.cpp's speed here, in a line."""
        has = self.features.__contains__
        if self.family == "x86_64":
            extras = [name for name, flag in (("VNNI", "AVX512_VNNI"), ("VBMI", "AVX512_VBMI"),
                                                ("BF16", "AVX512_BF16")) if has(flag)]
            avx512 = f"yes ({', '.join(extras)})" if has("AVX512") and extras else "yes" if has("AVX512") else "no"
            if has("AMX_TILE") and has("AMX_INT8"):
                amx = "yes"
            elif has("AMX_TILE"):
                amx = "no (tiles advertised without AMX-INT8)"
            else:
                amx = "no"
            return f"AVX2 {'yes' if has('AVX2') else 'no'}, AVX-512 {avx512}, AMX {amx}"
        if self.family in ("aarch64", "darwin-arm64"):
            words = [f"{label} {'yes' if has(flag) else 'no'}" for label, flag in (
                ("dotprod", "DOTPROD"), ("i8mm", "MATMUL_INT8"), ("SVE", "SVE"), ("SME", "SME"))]
            return ", ".join(["NEON yes", *words])
        return f"no llama.cpp CPU variants known for {self.machine}"


def parse(system: str, machine: str, text: str) -> Cpu:
    """``text``: ``/proc/cpuinfo`` on Linux (its first processor is enough), the output of
    ``sysctl hw.optional machdep.cpu.brand_string`` on macOS."""
    system, machine = system.lower(), machine.lower()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    if system == "darwin":
        features = {name for key, name in MAC_FLAGS.items() if fields.get(f"hw.optional.arm.{key}") == "1"}
        model = fields.get("machdep.cpu.brand_string", "Apple")
        return Cpu(system, machine, model, frozenset(features))
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    table = X86_FLAGS if machine in ("x86_64", "amd64") else ARM_FLAGS
    features = {name for name, needed in table.items() if set(needed) <= flags}
    model = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or machine
    return Cpu(system, machine, model, frozenset(features))


def local_cpu() -> Cpu:
    """This machine's CPU."""
    system, machine = platform.system().lower(), platform.machine().lower()
    if system == "darwin":
        text = subprocess.run(["sysctl", "hw.optional", "machdep.cpu.brand_string"], capture_output=True,
                              text=True, check=False).stdout
    else:
        try:
            with open("/proc/cpuinfo", errors="replace") as handle:
                text = handle.read().split("\n\n", 1)[0]
        except OSError:
            text = ""
    return parse(system, machine, text)


def ranked(cpu: Cpu, available: Iterable[str] | None = None) -> list[Variant]:
    """The variants this CPU advertises everything for, best first (llama.cpp's own order);
    only those in ``available`` (the build's) when given."""
    have = None if available is None else set(available)
    fits = [v for v in VARIANTS.get(cpu.family, ()) if cpu.runs(v) and (have is None or v.name in have)]
    return sorted(fits, key=lambda v: v.score, reverse=True)

