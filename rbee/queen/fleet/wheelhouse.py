"""The offline wheelhouse: rbee and every package it runs on, as wheels for a
host's platform, built here and pushed over SFTP so hosts need no index.

Versions are pinned to what this queen runs, so every hive runs the same code.
Wheels are cached under ``~/.cache/rbee/wheelhouse/<tag>/``; rbee's own wheel
is keyed by a hash of its source, so an unchanged tree is never rebuilt.
llama-cpp-python is never taken from pip's cache or this queen's own install (either
may be built for this CPU only): hosts of this platform get rbee's portable build
(``rbee.engine.build``), hosts of another build it from source.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import rbee
from rbee.engine import build as engine_build
from rbee.errors import WheelhouseError
from rbee.link.schemas import HostProbe

Narrate = Callable[[str, str], None]

# Installed for the hive only where it can run; the rest of rbee's closure always.
OPTIONAL_ENGINES = {"mlx-lm", "mlx"}
#: what a host builds llama-cpp-python with (InstallPath.build): pinned, hashed, in the digest
BUILD_TOOLS = ("scikit-build-core[pyproject]==1.1.2", "cmake==4.4.5", "ninja==1.13.2")
#: MLX for hosts that run it, when this queen has none installed to pin to
MLX_DEFAULTS = {"mlx-lm": "0.32.2", "mlx": "0.32.4"}


def mlx_pins(target_apple: bool) -> list[str]:
    """mlx-lm (and mlx[cpu] off Apple Silicon) at the versions this queen runs, else MLX_DEFAULTS."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return MLX_DEFAULTS[name]

    pins = [f"mlx-lm=={version('mlx-lm')}"]
    return pins if target_apple else [*pins, f"mlx[cpu]=={version('mlx')}"]


def sha256_file(path: Path) -> str:
    """A file's sha256, remembered beside it (``NAME.sha256``, keyed by size and mtime): the
    model package alone is 250 MB, hashed once."""
    info = path.stat()
    stamp = f"{info.st_size} {info.st_mtime_ns}"
    memo = path.with_name(path.name + ".sha256")
    try:
        kept_stamp, _, kept = memo.read_text().rpartition(" ")
        if kept_stamp == stamp and len(kept) == 64:
            return kept
    except OSError:
        pass
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    with contextlib.suppress(OSError):
        memo.write_text(f"{stamp} {digest}")
    return digest


@dataclass(frozen=True)
class Platform:
    """What a host's pip needs matched: OS, machine and Python minor version."""

    system: str
    machine: str
    python: str  # "3.11"

    @classmethod
    def local(cls) -> Platform:
        import platform

        python = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return cls(platform.system().lower(), platform.machine().lower(), python)

    @property
    def apple_silicon(self) -> bool:
        return self.system == "darwin" and self.machine in ("arm64", "aarch64")

    @property
    def tag(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.system}-{self.machine}"


@dataclass(frozen=True)
class WheelSet:
    wheels: tuple[Path, ...]
    digest: str  # over the names and contents: equal digest = nothing to install
    #: file name -> sha256 of every file pushed to a host, checked there before pip runs
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(path.stat().st_size for path in self.wheels)

    def named(self, prefix: str) -> Path:
        """The one wheel whose file name starts with ``prefix`` (``"rbee-"``, ``"pip-"``)."""
        return next(path for path in self.wheels if path.name.startswith(prefix))


def project_root() -> Path | None:
    root = Path(rbee.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def requirement_closure(root: str = "rbee") -> list[str]:
    """``name==version`` for every installed distribution rbee needs at run time (no extras)."""
    env = default_environment()
    pinned: dict[str, str] = {}
    pending = [root]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in pinned:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pinned[name] = dist.version
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is not None and not requirement.marker.evaluate({**env, "extra": ""}):  # type: ignore[dict-item]
                continue
            pending.append(requirement.name)
    pinned.pop(canonicalize_name(root), None)
    return sorted(f"{name}=={version}" for name, version in pinned.items() if name not in OPTIONAL_ENGINES)


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted([root / "pyproject.toml", *(root / "rbee").rglob("*.py")]):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def wheel_key(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return canonicalize_name(name), version.replace("_", "-")


def planned_digest(target: Platform, mlx: bool = False, llama_source: bool = False) -> str:
    """What a host would get, as a digest: rbee's source, every pinned requirement, the platform
    and the install options. Computed without building or hashing a wheel (the model package
    alone is 250 MB), so `fleet plan` touches nothing; equal digest = nothing to install."""
    root = project_root()
    parts = [target.tag, f"mlx={mlx or target.apple_silicon}", f"llama_source={llama_source}",
             f"engine_build={engine_build.BUILD_ID}",
             f"rbee={rbee.__version__}:{source_hash(root) if root else 'installed'}",
             f"pip=={metadata.version('pip')}", *requirement_closure()]
    if llama_source:
        parts += [f"llama-cpp-python-source=={metadata.version('llama-cpp-python')}", *BUILD_TOOLS]
    if mlx or target.apple_silicon:
        parts += mlx_pins(target.apple_silicon)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class Wheelhouse:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = asyncio.Lock()
        self._built: dict[str, WheelSet] = {}

    async def build(self, target: Platform, narrate: Narrate, mlx: bool = False,
                    llama_source: bool = False) -> WheelSet:
        """Wheels for ``target`` (plus mlx-lm when ``mlx`` or on Apple Silicon), from cache when
        present. With ``llama_source``, llama-cpp-python comes as its source and build tools
        instead of a wheel, for the host to build (InstallPath.build). Safe to call from many
        hosts at once."""
        key = f"{target.tag}{'+mlx' if mlx else ''}{'+src' if llama_source else ''}"
        async with self._lock:
            if key not in self._built:
                self._built[key] = await self._build(target, narrate, mlx, llama_source)
            return self._built[key]

    async def _build(self, target: Platform, narrate: Narrate, mlx: bool, llama_source: bool) -> WheelSet:
        local = Platform.local()
        folder = self.cache_dir / target.tag
        folder.mkdir(parents=True, exist_ok=True)
        rbee_wheel = await self._rbee_wheel(narrate)
        # pip itself too: hosts run it from its wheel, so a venv needs no ensurepip (~3 s a host)
        wanted = [*requirement_closure(), f"pip=={metadata.version('pip')}"]
        llama = [req for req in wanted if canonicalize_name(req.split("==")[0]) == "llama-cpp-python"]
        wanted = [req for req in wanted if req not in llama]
        have = {wheel_key(path.name): path for path in folder.glob("*.whl")}
        missing = [req for req in wanted if (canonicalize_name(req.split("==")[0]), req.split("==")[1]) not in have]
        if missing:
            source = "built here" if target == local else "fetched from the package index"
            narrate("wheelhouse", f"{len(missing)} wheels for {target.tag} {source}: {', '.join(missing)}")
            if target == local:
                args = ["wheel", "--no-deps", "--wheel-dir", str(folder), *missing]
            else:
                args = [
                    "download", "--no-deps", "--only-binary=:all:", "--dest", str(folder),
                    "--python-version", target.python, "--implementation", "cp",
                    *platform_args(target), *missing,
                ]
            await _pip(args, f"collecting wheels for {target.tag}")
            have = {wheel_key(path.name): path for path in folder.glob("*.whl")}
        wheels = [rbee_wheel]
        if mlx or target.apple_silicon:
            wheels += await self._mlx_wheels(target, folder, narrate)
        if llama_source:
            wheels += await self.llama_sources(target, narrate)
        elif llama:
            if target != local:
                raise WheelhouseError(f"llama-cpp-python has no wheel for {target.tag}: it is built on such a host")
            wheels.append(await self.engine_wheel(llama[0].split("==")[1], narrate))
        for req in wanted:
            name, version = req.split("==")
            path = have.get((canonicalize_name(name), version))
            if path is None:
                raise WheelhouseError(f"no wheel of {req} for {target.tag} in {folder}")
            wheels.append(path)
        hashes = await asyncio.to_thread(lambda: {path.name: sha256_file(path) for path in wheels})
        return WheelSet(tuple(wheels), await asyncio.to_thread(planned_digest, target, mlx, llama_source), hashes)

    async def llama_sources(self, target: Platform, narrate: Narrate) -> list[Path]:
        """llama-cpp-python's source and its build tools as wheels for ``target``, so the host
        builds it with its own compiler (and CUDA or Metal where it has them) without reaching
        an index. PyPI has no llama-cpp-python wheels, so this is also how another platform gets it."""
        version = metadata.version("llama-cpp-python")
        pins = hashlib.sha256("\n".join(BUILD_TOOLS).encode()).hexdigest()[:12]
        folder = self.cache_dir / target.tag / f"llama-source-{pins}"
        if not any(folder.glob(f"llama_cpp_python-{version}.tar.gz")):
            narrate("wheelhouse", f"fetching llama-cpp-python {version} source and its build tools for {target.tag} "
                                  "from the package index")
            await _pip(["download", "--no-deps", "--no-binary=:all:", "--dest", str(folder),
                        f"llama-cpp-python=={version}"], "fetching llama-cpp-python's source")
            cross = [] if target == Platform.local() else [
                "--python-version", target.python, "--implementation", "cp", *platform_args(target)]
            await _pip(["download", "--only-binary=:all:", "--dest", str(folder), *cross, *BUILD_TOOLS],
                       "collecting build tools")
        return sorted([*folder.glob("*.tar.gz"), *folder.glob("*.whl")])

    async def engine_wheel(self, version: str, narrate: Narrate) -> Path:
        """rbee's portable llama-cpp-python wheel for this platform, built once (minutes) into
        ``~/.cache/rbee/engine/`` (the same one ``scripts/setup`` installs here)."""
        found = engine_build.cached_wheel(version)
        if found is not None:
            return found
        narrate("wheelhouse", f"building llama-cpp-python {version} for every CPU of this platform "
                              f"({engine_build.cmake_args()}): minutes, once")
        try:
            return await asyncio.to_thread(engine_build.portable_wheel, version)
        except (RuntimeError, OSError) as exc:
            raise WheelhouseError(str(exc)) from exc

    async def _mlx_wheels(self, target: Platform, folder: Path, narrate: Narrate) -> list[Path]:
        """mlx-lm and what it needs, resolved by pip for that platform (``mlx[cpu]`` on Linux).
        llama.cpp needs nothing extra: it is in rbee's own closure."""
        packages = mlx_pins(target.apple_silicon)
        mlx_dir = folder / ("mlx-" + hashlib.sha256("\n".join(packages).encode()).hexdigest()[:12])
        if not any(mlx_dir.glob("mlx_lm-*.whl")):
            narrate("wheelhouse", f"collecting {', '.join(packages)} for {target.tag}")
            cross = [] if target == Platform.local() else [
                "--python-version", target.python, "--implementation", "cp", *platform_args(target)]
            await _pip(["download", "--only-binary=:all:", "--dest", str(mlx_dir), *cross, *packages],
                       f"collecting mlx-lm for {target.tag}")
        return sorted(mlx_dir.glob("*.whl"))

    async def _rbee_wheel(self, narrate: Narrate) -> Path:
        root = project_root()
        if root is None:
            raise WheelhouseError(
                "cannot build rbee's wheel: this rbee is not installed from a source tree. Install it with "
                "`pip install -e .` from a checkout, which the queen needs to install hives"
            )
        folder = self.cache_dir / "rbee" / await asyncio.to_thread(source_hash, root)
        found = sorted(folder.glob("rbee-*.whl"))
        if found:
            return found[0]
        narrate("wheelhouse", f"building rbee {rbee.__version__} from {root}")
        tmp = folder.with_name(folder.name + ".tmp")
        await _pip(["wheel", "--no-deps", "--wheel-dir", str(tmp), str(root)], "building rbee's wheel")
        tmp.rename(folder)
        return sorted(folder.glob("rbee-*.whl"))[0]


def platform_args(target: Platform) -> list[str]:
    machine = {"arm64": "arm64", "aarch64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64"}.get(target.machine)
    if target.system == "darwin":
        return [arg for tag in (f"macosx_11_0_{machine}", f"macosx_14_0_{machine}", "macosx_11_0_universal2")
                for arg in ("--platform", tag)]
    if target.system == "linux":
        tags = [f"manylinux_2_{minor}_{machine}" for minor in range(39, 16, -1)] + [f"linux_{machine}"]
        return [arg for tag in tags for arg in ("--platform", tag)]
    raise WheelhouseError(f"rbee cannot build a wheelhouse for {target.system}/{target.machine}")


async def _pip(args: list[str], what: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        text = output.decode(errors="replace").strip()
        hint = ""
        if re.search(r"No matching distribution|Could not find a version", text):
            hint = " (a package has no prebuilt wheel for that platform; install it on the host by hand)"
        raise WheelhouseError(f"{what} failed{hint}:\n{text[-1500:]}")


def host_platform_of(probe: HostProbe) -> Platform:
    return Platform(probe.system.lower(), probe.machine.lower(), probe.python)

