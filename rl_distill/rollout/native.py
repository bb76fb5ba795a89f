"""The native float32 decode kernels (``few_rows.c``), compiled on first use and checked before use.

The environment's teacher advances 8 rows at a time, so each of its steps streams every weight once
for 8 rows of products: at 2 floating-point operations per weight per row, on these CPUs that sits
between memory bandwidth and compute. oneDNN's inner product with a packed weight
(:mod:`rl_distill.rollout.packed`) reached about 40% of the measured float32 matmul peak there; the
small kernel in ``few_rows.c`` (one pass over a panel-packed weight, 8 x 48 accumulators) measured
about 1.4x faster over the SmolLM2 teacher's products (``docs/results/performance.md``, section 7).

Around those products a decode step through PyTorch is some 15 small operations per layer (norms,
rotary embedding, cache writes, attention, SiLU, residual adds), each a dispatch and, on 2 threads,
a fork-join: about a third of the step. ``decode_layers_f32`` in the same file runs every decoder
layer of a Llama-family step in one call and one parallel region (the products split by panels,
attention by row and key/value head, each output written by one thread: the result does not depend
on the thread count); :class:`~rl_distill.rollout.fused_step.FusedDecodeStep` uses it in float32.

It is built here, not shipped as a binary: the first call compiles ``few_rows.c`` with the C
compiler (``$CC``, else ``cc``/``gcc``, ``-O3 -march=native -fopenmp``) into the user's cache
(``$XDG_CACHE_HOME`` or ``~/.cache``, ``rl_distill/kernels/``, named by a hash of the source, the
compiler and the CPU, written atomically), loads it with :mod:`ctypes` and compares a product with
``F.linear``. Where any of that is impossible (no compiler, no AVX-512F, not x86-64, a failed build
or check) :func:`few_row_kernel` returns None, :func:`unavailable_reason` says why, and callers keep
oneDNN's product. ``RL_DISTILL_NATIVE_KERNELS=0`` switches it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ENV_SWITCH", "DecodeLayer", "FewRowKernel", "few_row_kernel", "unavailable_reason"]

#: Environment variable that switches the native kernel off (``0``, ``false``, ``no``, ``off``).
ENV_SWITCH = "RL_DISTILL_NATIVE_KERNELS"
SOURCE = Path(__file__).with_name("few_rows.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


class DecodeLayer(ctypes.Structure):
    """One decoder layer's pointers for ``decode_layers_f32`` (``decode_layer_t`` in ``few_rows.c``).

    Weights are panel-packed (:meth:`FewRowKernel.pack`) fused maps: q/k/v, o, gate/up, down; biases
    and norms are plain float32 vectors (a null bias: none). ``keys``/``values`` are the layer's
    ``(M, kv_heads, cap, head_dim)`` contiguous cache buffers.
    """

    _fields_ = [
        *[
            (name, ctypes.c_void_p)
            for name in (
                "norm_in",
                "qkv",
                "qkv_bias",
                "o",
                "o_bias",
                "norm_post",
                "gate_up",
                "gate_up_bias",
                "down",
                "down_bias",
                "keys",
                "values",
            )
        ],
        ("cap", ctypes.c_long),
        ("eps_in", ctypes.c_float),
        ("eps_post", ctypes.c_float),
    ]


class KernelUnavailable(RuntimeError):
    """Why the native kernel cannot be used here (the message is :func:`unavailable_reason`)."""


class FewRowKernel:
    """The loaded kernel: pack an ``(N, K)`` float32 weight once, then multiply few rows by it.

    Example::

        kernel = few_row_kernel()  # None where unavailable
        packed = kernel.pack(linear.weight)
        y = kernel.product(x, packed, linear.out_features, linear.bias)  # == F.linear to rounding

    Attributes:
        path: the compiled library.
        panel_width: output columns per packed panel (48).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        self._fn = lib.few_rows_f32
        self._fn.restype = None
        self._fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_long,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_long,
            ctypes.c_long,
            ctypes.c_long,
            ctypes.c_long,
            ctypes.c_int,
        ]
        self.panel_width = int(lib.few_rows_panel_width())
        self._layers_fn = lib.decode_layers_f32
        self._layers_fn.restype = ctypes.c_int
        self._layers_fn.argtypes = [
            ctypes.POINTER(DecodeLayer),
            ctypes.c_int,
            ctypes.c_void_p,
            *[ctypes.c_long] * 6,
            *[ctypes.c_void_p] * 3,
            ctypes.c_long,
            ctypes.c_float,
            ctypes.c_int,
        ]
        if int(lib.decode_layer_struct_size()) != ctypes.sizeof(DecodeLayer):
            raise OSError("decode_layer_t in few_rows.c does not match native.DecodeLayer")

    def decode_layers(
        self,
        layers: ctypes.Array[DecodeLayer],
        h: Tensor,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        used: int,
        scaling: float,
    ) -> None:
        """Run Llama decoder layers on one new token per row, in place (``few_rows.c``, ``decode_layers_f32``).

        No argument is checked here: the caller (:class:`~rl_distill.rollout.fused_step.FusedDecodeStep`)
        owns every buffer the layers point to.

        Args:
            layers: one :class:`DecodeLayer` per layer (packed weights, norms, key/value buffers with
                at least ``used + 1`` columns).
            h: ``(M, hidden)`` contiguous float32 residual stream (the embedded tokens), updated in place.
            heads: query heads.
            kv_heads: key/value heads (dividing ``heads``).
            head_dim: the size of each head.
            intermediate: the MLP's inner size.
            cos: ``(M, head_dim)`` contiguous float32 rotary cosines of each row's position.
            sin: the same sines.
            mask: ``(M, used + 1)`` contiguous float32 additive mask (0 or -inf) over the columns.
            used: cached columns before this token (its key and value go to column ``used``).
            scaling: the attention's score scale.

        Raises:
            MemoryError: when the kernel's scratch memory could not be allocated.
        """
        rows, hidden = h.shape
        status = self._layers_fn(
            layers,
            len(layers),
            h.data_ptr(),
            rows,
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            cos.data_ptr(),
            sin.data_ptr(),
            mask.data_ptr(),
            used,
            scaling,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("the native decode layers could not allocate their scratch memory")

    def pack(self, weight: Tensor) -> Tensor:
        """``(ceil(N / 48), K, 48)`` float32 panels of an ``(N, K)`` weight (zero past ``N``)."""
        with torch.no_grad():
            w = weight.detach().to(device="cpu", dtype=torch.float32)
            n, k = w.shape
            pad = -n % self.panel_width
            w = F.pad(w, (0, 0, 0, pad)) if pad else w
            return w.reshape(-1, self.panel_width, k).transpose(1, 2).contiguous()

    def product(self, x: Tensor, packed: Tensor, out_features: int, bias: Tensor | None = None) -> Tensor:
        """``F.linear(x, weight, bias)`` for 2-D float32 ``x`` (rows, K) and ``packed = pack(weight)``."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
            raise ValueError(f"the native product takes 2-D float32 CPU rows, got {x.dtype} {tuple(x.shape)}")
        if x.stride(1) != 1:
            x = x.contiguous()
        rows, k = x.shape
        if packed.shape[1] != k or packed.shape[0] * self.panel_width < out_features:
            raise ValueError(
                f"packed weight {tuple(packed.shape)} does not match {k} inputs, {out_features} outputs"
            )
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        y = torch.empty(rows, out_features, dtype=torch.float32)
        self._fn(
            x.data_ptr(),
            x.stride(0),
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            out_features,
            rows,
            out_features,
            k,
            torch.get_num_threads(),
        )
        return y


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "rl_distill" / "kernels"


def _build() -> FewRowKernel:
    """Compile (or reuse), load and check the kernel; raises :class:`KernelUnavailable` with the reason."""
    if _switched_off():
        raise KernelUnavailable(f"switched off by {ENV_SWITCH}={os.environ.get(ENV_SWITCH)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"built for x86-64 only, this machine is {platform.machine()}")
    flags = _cpu_flags()
    if "avx512f" not in flags:
        raise KernelUnavailable(
            "the CPU has no AVX-512F (the kernel's 24 accumulators need 32 vector registers)"
        )
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelUnavailable("no C compiler ($CC, cc or gcc) to build rl_distill/rollout/few_rows.c")
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"the C compiler {compiler!r} does not run: {exc}") from exc
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(), " ".join(sorted(flags)).encode()])
    ).hexdigest()[:16]
    target = _cache_dir() / f"few_rows-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise KernelUnavailable(f"building {SOURCE.name} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailable(f"building {SOURCE.name} failed: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        kernel = FewRowKernel(target)
    except (OSError, AttributeError) as exc:
        raise KernelUnavailable(f"loading {target} failed: {exc}") from exc
    _self_check(kernel)
    return kernel


def _self_check(kernel: FewRowKernel) -> None:
    """Every row count 1-17 and a ragged last panel against ``F.linear``."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(100, 40, generator=gen)
    bias = torch.randn(100, generator=gen)
    packed = kernel.pack(weight)
    for rows in range(1, 18):
        x = torch.randn(rows, 40, generator=gen)
        for b in (None, bias):
            got = kernel.product(x, packed, 100, b)
            if not torch.allclose(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5):
                raise KernelUnavailable(
                    f"the built kernel {kernel.path} disagrees with F.linear at {rows} rows"
                )


@cache
def _kernel_or_reason() -> FewRowKernel | str:
    try:
        return _build()
    except KernelUnavailable as exc:
        return str(exc)


def few_row_kernel() -> FewRowKernel | None:
    """The native kernel, built and checked once per process; None where unavailable (see the reason)."""
    if _switched_off():
        return None
    found = _kernel_or_reason()
    return found if isinstance(found, FewRowKernel) else None


def unavailable_reason() -> str | None:
    """Why :func:`few_row_kernel` is None (None when it is available)."""
    if _switched_off():
        return f"switched off by {ENV_SWITCH}={os.environ.get(ENV_SWITCH)}"
    found = _kernel_or_reason()
    return None if isinstance(found, FewRowKernel) else found
