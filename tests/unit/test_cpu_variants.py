"""Which llama.cpp CPU variant fits a CPU, decided from what the CPU reports, on captures of
real machines: ``amd-epyc-avx2.txt`` is the machine this was written on (AVX2, no AVX-512);
``xeon-vm-amx-tile-only.txt`` is the cloud VM of issue 22 as the issue reports its flags
(AVX-512 with VNNI/BF16/FP16 and ``amx_tile``, no ``amx_int8``/``amx_bf16``); the Sapphire
Rapids file is that VM's flags with the AMX ones a bare-metal Xeon adds; ARM (Neoverse V1),
Apple M2 (sysctl) and a 2011 Sandy Bridge."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.engine.build import installed
from rbee.engine.cpu import VARIANTS, Cpu, local_cpu, parse, ranked
from rbee.link.schemas import HostProbe
from rbee.queen.fleet.plan import cpu_line

CAPTURES = Path(__file__).parent / "cpuinfo"


def cpu(name: str, system: str = "linux", machine: str = "x86_64") -> Cpu:
    return parse(system, machine, (CAPTURES / name).read_text())


def best(found: Cpu) -> str:
    return ranked(found)[0].name


def test_an_avx2_box_gets_haswell_and_nothing_with_avx512() -> None:
    epyc = cpu("amd-epyc-avx2.txt")
    assert epyc.model == "AMD EPYC"
    assert {"AVX2", "FMA", "F16C", "BMI2", "SSE42"} <= epyc.features and "AVX512" not in epyc.features
    assert best(epyc) == "haswell"
    assert [v.name for v in ranked(epyc)] == ["haswell", "piledriver", "ivybridge", "sandybridge", "sse42", "x64"]
    assert epyc.summary() == "AVX2 yes, AVX-512 no, AMX no"


def test_a_vm_that_advertises_amx_tiles_without_amx_int8_never_gets_the_amx_variant() -> None:
    vm = cpu("xeon-vm-amx-tile-only.txt")
    assert "AMX_TILE" in vm.features and "AMX_INT8" not in vm.features
    names = [v.name for v in ranked(vm)]
    assert "sapphirerapids" not in names
    assert names[0] == "zen4"  # AVX-512 with VBMI, VNNI and BF16: llama.cpp's next best score
    assert vm.summary() == "AVX2 yes, AVX-512 yes (VNNI, VBMI, BF16), AMX no (tiles advertised without AMX-INT8)"


def test_a_xeon_with_amx_int8_gets_sapphirerapids_then_falls_back_to_avx512() -> None:
    xeon = cpu("xeon-sapphirerapids.txt")
    assert [v.name for v in ranked(xeon)][:2] == ["sapphirerapids", "zen4"]
    assert xeon.summary().endswith("AMX yes")


def test_an_old_cpu_without_avx2_gets_sandybridge() -> None:
    old = cpu("sandybridge.txt")
    assert best(old) == "sandybridge"
    assert old.summary() == "AVX2 no, AVX-512 no, AMX no"


def test_an_arm_server_gets_its_dotprod_fp16_sve_i8mm_level() -> None:
    graviton = cpu("neoverse-v1.txt", machine="aarch64")
    assert graviton.model == "0xd40"
    assert best(graviton) == "armv8.6_1"
    assert graviton.summary() == "NEON yes, dotprod yes, i8mm yes, SVE yes, SME no"


def test_a_mac_is_read_from_sysctl() -> None:
    m2 = cpu("apple-m2.txt", system="darwin", machine="arm64")
    assert m2.model == "Apple M2" and best(m2) == "apple_m2_m3"


def test_only_the_variants_a_build_has_are_ranked() -> None:
    vm = cpu("xeon-vm-amx-tile-only.txt")
    assert [v.name for v in ranked(vm, available=["x64", "haswell", "sapphirerapids"])] == ["haswell", "x64"]


def test_fleet_plan_names_the_variant_and_the_features_per_host() -> None:
    probe = HostProbe(system="linux", machine="x86_64", python="3.11",
                      cpu=(CAPTURES / "xeon-vm-amx-tile-only.txt").read_text())
    line = cpu_line(probe)
    assert line.startswith("Intel Xeon Processor: AVX2 yes, AVX-512 yes")
    assert "variant zen4 (by its features; proven at install)" in line
    proven = probe.model_copy(update={"engine": {"variant": "icelake"}})
    assert cpu_line(proven).endswith("variant icelake (proven there)")
    assert cpu_line(probe.model_copy(update={"cpu": ""})) == "CPU not reported"


def test_the_table_matches_the_installed_build_and_llamas_own_scores_on_this_cpu() -> None:
    """The mirror of llama.cpp's variant list and scores is the build's: same names, the same
    score wherever llama.cpp's own cpuid check accepts a variant, and every variant this machine's
    /proc/cpuinfo allows is accepted. (cpuid may accept more than the kernel lets run, e.g. AMX on
    the VM of issue 22: that is what the proof is for.)"""
    build = installed()
    if build is None or not build.portable:
        pytest.skip("needs the portable llama-cpp-python (scripts/setup)")
    from rbee.engine.backends import scores

    here = local_cpu()
    assert set(build.cpu_modules) == {v.name for v in VARIANTS[here.family]}
    table = {v.name: v for v in VARIANTS[here.family]}
    llama = scores(build)
    for name, score in llama.items():
        if here.runs(table[name]):
            assert score > 0, name
        if score > 0:
            assert score == table[name].score, name
    assert max(llama, key=lambda name: llama[name]) == ranked(here, build.cpu_modules)[0].name or any(
        llama[name] > 0 and not here.runs(table[name]) for name in llama)
