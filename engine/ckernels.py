"""Small C kernels compiled on first use for this CPU and kept on disk.

kvrelay's own CPU kernels (``engine.cpu_gemv``, ``engine.cpu_attention``) are plain C:
OpenMP for the threads, the compiler's vectorizer or GCC's vector types for AVX2/AVX-512.
Each is compiled once with the machine's C compiler (``$CC``, ``cc`` or ``gcc``) for this
CPU (``-march=native``) and kept under ``$KVRELAY_CACHE_DIR/kernels``, keyed by the source,
the compiler, the flags and the CPU's model and instruction-set flags; workers starting
together build it once, under a file lock. Where no compiler is available (or the build
fails) ``load`` returns None and callers use their PyTorch path instead. A library links
to the OpenMP runtime torch has already loaded (same soname), so it shares torch's threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def compiler() -> str | None:
    """The C compiler to build with (``$CC``, ``cc`` or ``gcc``), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def cpu_identity() -> str:
    """The CPU model and its instruction-set flags: a library built with ``-march=native``
    for one CPU must not be loaded on another, nor on the same model in a VM that hides
    some of its instructions (AVX-512), where it would die of an illegal instruction."""
    found = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "flags") and name not in found:
                found[name] = value.strip()
            if len(found) == 2:
                break
    return "\n".join((os.uname().machine, found.get("model name", ""), found.get("flags", "")))


def default_dir() -> Path:
    """``$KVRELAY_CACHE_DIR/kernels`` (default ``~/.cache/kvrelay/kernels``)."""
    root = os.environ.get("KVRELAY_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache/kvrelay") / "kernels"


def build(name: str, source: str, cache_dir: Path, libs: Sequence[str] = ()) -> Path | None:
    """The compiled library ``name``, built once per source, flags and CPU model (None: no
    compiler or the build failed)."""
    cc = compiler()
    if cc is None:
        log.info("no C compiler: the %s kernel is not used", name)
        return None
    key = hashlib.sha256("\0".join((source, cc, *FLAGS, *libs, cpu_identity())).encode()
                         ).hexdigest()[:20]
    path = cache_dir / f"{name}-{key}.so"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            done = subprocess.run([cc, *FLAGS, "-o", str(out), str(src), *libs],
                                  capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                log.warning("the %s kernel did not compile (%s): %s", name, cc,
                            done.stderr.strip()[-500:])
                return None
            os.replace(out, path)
    return path


def load(name: str, source: str, symbol: str, argtypes: Sequence[Any],
         cache_dir: Path | None = None, libs: Sequence[str] = ()) -> Any:
    """The C function ``symbol`` of the library built from ``source`` (returning int), or
    None where it cannot be built or loaded. A ``ctypes.CDLL`` call releases the GIL."""
    try:
        path = build(name, source, cache_dir or default_dir(), libs)
        if path is None:
            return None
        fn = getattr(ctypes.CDLL(str(path)), symbol)
        fn.argtypes = list(argtypes)
        fn.restype = ctypes.c_int
        return fn
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("the %s kernel is not available: %s", name, err)
        return None


def switched_on(variable: str) -> bool:
    """Whether the environment leaves a kernel on: ``variable`` unset, or anything but
    ``0``, ``false``, ``no`` or ``off`` (read when asked, so a test or a worker's settings
    can switch a kernel between passes)."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


def float32_operands(x: torch.Tensor, out_features: int, in_features: int,
                     bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (M, in) and ``bias`` (out,) made contiguous for a product kernel, or
    RuntimeError naming what does not fit (float32 only)."""
    x = x.contiguous()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_features:
        raise RuntimeError(f"input is {tuple(x.shape)} {x.dtype}, "
                           f"weight takes {in_features} floats")
    if bias is not None:
        bias = bias.contiguous()
        if bias.dtype != torch.float32 or bias.numel() != out_features:
            raise RuntimeError("bias must be float32 with one value per output")
    return x, bias

