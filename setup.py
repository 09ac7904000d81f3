"""Builds fused_resnet and its optional C++/CUDA extension fused_resnet._C.

    pip install --no-build-isolation -e .        # against the torch already installed (never reinstalls it)

Environment:
    FUSED_RESNET_SKIP_EXT=1    build no extension (the package runs without _C, on its Triton/reference backends)
    FUSED_RESNET_CPU_ONLY=1    build only the CPU part of _C even where nvcc is available
    TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0a": A100-class and H100; no GPU needed to build)
    CUTLASS_PATH               a CUTLASS source tree (include/, tools/util/include/) for the Hopper engine, when the
                               nvidia-cutlass wheel is not installed; the engine is built where 9.0a is in the list
    MAX_JOBS                   parallel compile jobs (ninja)
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"


def _version() -> str:
    text = (ROOT / "fused_resnet" / "_version.py").read_text()
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("cannot find __version__ in fused_resnet/_version.py")
    return match.group(1)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths for in-place (editable) builds.
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _nvcc(cuda_home: str | None) -> str | None:
    """nvcc of a real toolkit root: a wrapper script on PATH makes torch guess a CUDA_HOME without headers."""
    if cuda_home is None:
        return None
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    headers = Path(cuda_home) / "include" / "cuda_runtime.h"
    return str(nvcc) if nvcc.exists() and headers.exists() else None


def _cutlass_include_dirs() -> list[str] | None:
    """CUTLASS's header directories: from CUTLASS_PATH, else from the installed nvidia-cutlass wheel (its
    cutlass_library package carries the source tree). None when neither has them."""
    roots = [Path(os.environ["CUTLASS_PATH"])] if os.environ.get("CUTLASS_PATH") else []
    # find_spec locates the package without importing it (its __init__ pulls in the whole kernel generator).
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(location) / "source" for location in spec.submodule_search_locations]
    for root in roots:
        if (root / "include" / "cutlass" / "cutlass.h").exists():
            return [str(root / "include"), str(root / "tools" / "util" / "include")]
    return None


# _C runs inside a process whose libstdc++ is the shared one torch loaded. A second, static copy linked into _C
# (-static-libstdc++) has stream locales of its own that were never set up: outside a torch process here its integer
# insertion wrote nothing, and on the 2026-11-27 H100 machine the same call, in an input check's message, crashed.
_STATIC_LIBSTDCXX = "-static-libstdc++"


def _drop_static_libstdcxx() -> None:
    flags = os.environ.get("LDFLAGS", "").split()
    if _STATIC_LIBSTDCXX in flags:
        print(f"fused_resnet: building _C without the {_STATIC_LIBSTDCXX} of LDFLAGS (see setup.py)", file=sys.stderr)
        os.environ["LDFLAGS"] = " ".join(f for f in flags if f != _STATIC_LIBSTDCXX)


def _warn_if_own_libstdcxx(library: Path) -> None:
    """Warns where the linker put libstdc++'s stream code inside _C anyway (a compiler that links it statically
    by default, or a wrapper adding the flag)."""
    nm = shutil.which("nm")
    if nm is None or not library.exists():
        return
    symbols = subprocess.run([nm, "-C", "--defined-only", str(library)], capture_output=True, text=True).stdout
    if re.search(r"std::ostream::_M_insert<|std::num_put<", symbols):
        warnings.warn(
            f"{library.name} holds its own copy of libstdc++'s stream code (linked with {_STATIC_LIBSTDCXX}?): "
            "number formatting inside it breaks next to torch's shared libstdc++; rebuild it with the compiler's "
            "default, shared libstdc++",
            stacklevel=1,
        )


# The .cu files are torch-free (raw pointers + csrc/cuda/launch.h), so they compile in seconds (CUTLASS's excepted).
# -DNDEBUG: device-side asserts in CUTLASS's kernels are calls that make ptxas serialize the wgmma pipeline (warning
# C7510); our own kernels assert nothing at run time.
_NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "-DNDEBUG", "--expt-relaxed-constexpr"]


# The Hopper engine's files (csrc/cuda/conv_sm90_*.cu) are compiled apart from the rest, for sm_90a alone: their
# kernels exist only in sm_90a code (for any other architecture CUTLASS makes them stubs), yet each other entry of the
# arch list would cost a front-end pass over CUTLASS's headers, 8-10 s of nvcc per file on one core (measured on the
# 2-core machine, 2026-11-27), on the longest compiles of the build. They are torch-free, so they need none of torch's
# headers; they get the flags the other .cu files get (torch's own nvcc defines included, so that CUDA's headers read
# the same everywhere).
def _sm90_command(source: str, obj: Path, nvcc: str, include_dirs: list[str], macros: list) -> list[str]:
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    flags = [*_NVCC_FLAGS, *COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a"]
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f"-D{name}={value}" for name, value in macros] + [f"-I{d}" for d in include_dirs]
    if os.environ.get("CC"):  # as torch does for its nvcc calls
        flags = ["-ccbin", os.environ["CC"], *flags]
    return [nvcc, "-c", str(ROOT / source), "-o", str(obj), *flags]


class _Sm90Build:
    """The sm_90a files' compiles, started at once and run beside ninja's build of the rest (MAX_JOBS each): on the
    16-core GPU machine the build then lasts as long as its longest file rather than the sm_90a files followed by
    the rest; on 2 cores the total work, hence the time, is the same either way. wait() before the link."""

    def __init__(self, sources: list[str], nvcc: str, include_dirs: list[str], macros: list, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.sources = sources
        self.objects = [str(out_dir / (Path(source).stem + ".o")) for source in sources]
        self.jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        self.start = time.monotonic()
        self.pool = ThreadPoolExecutor(max_workers=self.jobs)
        self.futures = [
            self.pool.submit(self._compile_one, _sm90_command(source, Path(obj), nvcc, include_dirs, macros))
            for source, obj in zip(sources, self.objects, strict=True)
        ]

    @staticmethod
    def _compile_one(command: list[str]) -> float:
        start = time.monotonic()
        subprocess.run(command, check=True)
        return time.monotonic() - start

    def wait(self) -> None:
        """Returns when every file is compiled, and says how long each took; raises the first compile's error."""
        seconds = [future.result() for future in self.futures]
        each = ", ".join(f"{Path(s).stem} {t:.0f} s" for s, t in zip(self.sources, seconds, strict=True))
        total = time.monotonic() - self.start
        print(
            f"fused_resnet: {len(self.sources)} sm_90a files in {total:.0f} s ({self.jobs} jobs): {each}",
            file=sys.stderr,
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _checked(build_ext: type) -> type:
    class BuildExtensionAndCheck(build_ext):
        def build_extension(self, ext) -> None:
            sources = getattr(ext, "sm90_sources", None)
            if not sources:
                super().build_extension(ext)
                return
            out_dir = Path(self.build_temp) / "sm90"
            sm90 = _Sm90Build(sources, ext.sm90_nvcc, ext.include_dirs, ext.define_macros, out_dir)
            ext.extra_objects = [*ext.extra_objects, *sm90.objects]
            link = self.compiler.link_shared_object

            def link_when_sm90_built(*args, **kwargs):
                sm90.wait()
                return link(*args, **kwargs)

            self.compiler.link_shared_object = link_when_sm90_built
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
                sm90.close()

        def run(self) -> None:
            super().run()
            for output in self.get_outputs():
                _warn_if_own_libstdcxx(Path(output))

    return BuildExtensionAndCheck


def _extensions() -> tuple[list, dict]:
    if _flag("FUSED_RESNET_SKIP_EXT"):
        return [], {}
    _drop_static_libstdcxx()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # The torch version _C is built against (so that importing it under another torch fails with a clear message),
    # spelled as character codes: a quoted string does not survive the shell that ninja runs the compiler in.
    # g++ only: nvcc would split the value at its commas.
    version_chars = ",".join(str(ord(ch)) for ch in torch.__version__)
    # -g0 undoes the -g of Python's own CFLAGS: debug info for torch's templates only slows the build.
    cxx_flags = ["-O3", "-std=c++20", "-g0", f"-DFUSED_RESNET_TORCH_VERSION_CHARS={version_chars}"]
    # at::parallel_for is inline header code that runs in parallel only where the including file is compiled with
    # OpenMP (torch's Linux builds use its OpenMP backend): without -fopenmp every CPU pass ran on one thread. The
    # OpenMP runtime resolves to the libgomp torch has already loaded (same soname).
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [str(ROOT / "csrc")]

    with_cuda = torch.version.cuda is not None and not _flag("FUSED_RESNET_CPU_ONLY")
    if with_cuda and _nvcc(CUDA_HOME) is None:
        if shutil.which("nvcc") is not None:
            raise RuntimeError(
                f"nvcc is on PATH but torch found no CUDA toolkit under CUDA_HOME={CUDA_HOME!r}; set CUDA_HOME to the "
                "toolkit root (e.g. export CUDA_HOME=/usr/local/cuda-13.0), or FUSED_RESNET_CPU_ONLY=1 for a CPU build"
            )
        warnings.warn("no CUDA toolkit (nvcc) found: building fused_resnet._C without its CUDA kernels", stacklevel=1)
        with_cuda = False

    if not with_cuda:
        ext = CppExtension(
            "fused_resnet._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        return [ext], {"build_ext": _checked(BuildExtension)}

    # Read by torch's BuildExtension when it composes the -gencode flags; an explicit value is respected. Without
    # one, torch would ask the (possibly absent) GPU. sm_80 SASS also runs on sm_86/89; sm_90a is the H100's.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    cuda_sources = [src for src in _sources("csrc/cuda/*.cu") if not Path(src).name.startswith("conv_sm90_")]
    define_macros = [("FUSED_RESNET_WITH_CUDA", "1")]
    # The Hopper engine (CUTLASS sm90 kernels) exists only in sm_90a code; its six files (wide-tile conv, the next
    # kernels' convs, GEMM, per dtype) are compiled for sm_90a alone (_Sm90Build), 55-85 s of nvcc each on one core,
    # the longest compiles of the build. Not with a plain 9.0 entry beside it: an H100 could load that cubin, in which
    # CUTLASS's kernels are stubs that write nothing.
    arches = [a.split("+")[0] for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")]
    if "9.0a" in arches and "9.0" in arches:
        warnings.warn(
            "TORCH_CUDA_ARCH_LIST lists both 9.0 and 9.0a: building fused_resnet._C without its Hopper (sm90) engine",
            stacklevel=1,
        )
    sm90_sources: list[str] = []
    if "9.0a" in arches and "9.0" not in arches:
        cutlass_dirs = _cutlass_include_dirs()
        if cutlass_dirs is None:
            warnings.warn(
                "CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0, or set CUTLASS_PATH): building "
                "fused_resnet._C without its Hopper (sm90) engine",
                stacklevel=1,
            )
        else:
            sm90_sources = _sources("csrc/cuda/conv_sm90_*.cu")
            include_dirs += cutlass_dirs
            define_macros.append(("FUSED_RESNET_WITH_CUTLASS", "1"))
    ext = CUDAExtension(
        "fused_resnet._C",
        sources + _sources("csrc/cuda/*.cpp") + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": _NVCC_FLAGS,
        },
        extra_link_args=link_flags,
    )
    ext.sm90_sources = sm90_sources  # compiled by _Sm90Build (see there), linked in as objects
    ext.sm90_nvcc = _nvcc(CUDA_HOME)
    return [ext], {"build_ext": _checked(BuildExtension)}


ext_modules, cmdclass = _extensions()

setup(
    name="fused_resnet",
    version=_version(),
    description="ResNets for PyTorch with conv + BatchNorm + residual + ReLU fused into single kernels",
    packages=find_packages(include=["fused_resnet", "fused_resnet.*"]),
    package_data={"fused_resnet.ops": ["*.json"]},
    python_requires=">=3.11",
    # Loose on purpose: a CUDA build of torch that is already installed must satisfy it as is.
    install_requires=["torch>=2.11"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
