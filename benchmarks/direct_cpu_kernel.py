"""The register-blocked CPU direct convolution kernel (csrc/conv2d_direct/cpu_nhwc_kernels.h) in
isolation, beside a measured FMA peak and beside oneDNN (``F.conv2d``) on the same layers.

Three numbers per layer, all measured in this process, interleaved round by round:

* **peak**: a register-only probe, 16 (AVX-512) or 12 (AVX2) independent FMA chains on vector
  registers (no memory operands), the ceiling for any float32 kernel on this core;
* **kernel**: the microkernel alone (one output row of the layer, ``conv_row``, or the whole plane,
  ``conv_plane``, where the plane is narrower than a register block, as the op runs it) called
  over and over on the same L1/L2-resident input rows and filter block: what its inner loop
  sustains;
* **op vs oneDNN**: ``cnnext.ops.conv2d(algo="direct")`` and ``F.conv2d`` on the whole layer,
  NCHW and channels_last, at 1 and 2 threads.

The probe and the kernel driver are compiled from ``csrc`` by the system ``c++`` into a small
shared library (no torch headers; a few seconds) and called with ctypes. Before timing, the heap
is warmed on purpose: glibc serves allocations above its dynamic mmap threshold with fresh pages
on every call, and freeing one large mmapped chunk raises the threshold to that size (up to 32
MiB), after which both sides reuse memory. Without it the first implementation timed pays page
faults the second does not.

Usage::

    python -m benchmarks.direct_cpu_kernel [--isa avx512|avx2] [--threads 1,2]
        [--rounds 3] [--kernel-rounds 200] [--layers SUBSTRING] [--no-op]

``--suite`` instead times the suite's conv layers with C_in >= 64 (``benchmarks/shapes.py``,
NCHW) whole, ``cnnext.ops.conv2d(algo=--algo)`` against ``F.conv2d``, ``--passes fwd,fwd+bwd``
at ``--batches`` and ``--threads``; ``--fused`` times ``nn.ConvBNReLU2d`` in eval against eager
conv -> bn -> relu on the suite's fused layers. Both alternate the two call by call and keep each
one's fastest call, by default in process CPU time (``--clock cpu``): at one thread it leaves out
the time other processes held the core, which on a shared machine is most of the difference
between runs. Geometric means of the speed-up close each group.

(From the repository root, so that this checkout's cnnext is the one timed.)
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import cnnext

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
#include <chrono>
#include "common/cpu_vec.h"
#define CNNEXT_NHWC_ISA avx512
#define CNNEXT_NHWC_VEC ::cnnext::VecAvx512
#define CNNEXT_NHWC_TARGET CNNEXT_TARGET_AVX512
#include "conv2d_direct/cpu_nhwc_kernels.h"
#undef CNNEXT_NHWC_ISA
#undef CNNEXT_NHWC_VEC
#undef CNNEXT_NHWC_TARGET
#define CNNEXT_NHWC_ISA avx2
#define CNNEXT_NHWC_VEC ::cnnext::VecAvx2
#define CNNEXT_NHWC_TARGET CNNEXT_TARGET_AVX2
#include "conv2d_direct/cpu_nhwc_kernels.h"

using namespace cnnext;
static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// NACC independent accumulators (at least FMA latency x FMA ports: 4 x 2), all in registers with
// the two operands: 16 of 32 zmm, 12 of 16 ymm. The result is stored so nothing is optimised
// away. A macro, not a template: each copy needs its target attribute for the intrinsics.
#define PEAK(NAME, V, TARGET, NACC)                                       \
  TARGET static double NAME(long iters, float* sink) {                    \
    V::Reg a[NACC], x = V::broadcast(sink), y = V::broadcast(sink + 1);   \
    for (int i = 0; i < NACC; ++i) a[i] = V::zero();                      \
    for (long it = 0; it < iters; ++it) {                                 \
      for (int i = 0; i < NACC; ++i) a[i] = V::fma(a[i], x, y);           \
    }                                                                     \
    for (int i = 1; i < NACC; ++i) a[0] = V::add(a[0], a[i]);             \
    V::store(sink + 16, a[0]);                                            \
    return 2.0 * NACC * V::kLanes * iters;                                \
  }
PEAK(peak512, VecAvx512, CNNEXT_TARGET_AVX512, 16)
PEAK(peak256, VecAvx2, CNNEXT_TARGET_AVX2, 12)

extern "C" double fma_peak(int avx512, long iters, float* sink, double* seconds) {
  const double t0 = now();
  const double flops = avx512 ? peak512(iters, sink) : peak256(iters, sink);
  *seconds = now() - t0;
  return flops;
}

// `calls` calls of conv_row on the same data: x holds the rows of one output row's windows,
// w one packed filter block, out one row of ocb channels.
extern "C" double conv_rows(int avx512, int nv, long calls, const long* taps, long ntaps,
                            long chans, long xstep, const float* x, const float* w, long ocb,
                            long wo, float* out, double* seconds) {
  const nhwc::ConvArgs a{reinterpret_cast<const int64_t*>(taps), ntaps, chans, xstep, w, ocb};
  using Fn = void (*)(const nhwc::ConvArgs&, const float*, int64_t, float*);
  Fn fn = avx512 ? (nv == 4   ? &nhwc::avx512::conv_row<4, 6>
                    : nv == 2 ? &nhwc::avx512::conv_row<2, 12>
                              : &nhwc::avx512::conv_row<1, 16>)
                 : (nv == 2 ? &nhwc::avx2::conv_row<2, 6> : &nhwc::avx2::conv_row<1, 12>);
  const double t0 = now();
  for (long i = 0; i < calls; ++i) fn(a, x, wo, out);
  *seconds = now() - t0;
  return 2.0 * wo * nv * (avx512 ? 16 : 8) * chans * ntaps * calls;
}

// The same for conv_plane: a whole plane of npix pixels, windows at x + pix[j].
extern "C" double conv_planes(int avx512, int nv, long calls, const long* taps, long ntaps,
                              long chans, long xstep, const float* x, const float* w, long ocb,
                              const long* pix, long npix, float* out, double* seconds) {
  const nhwc::ConvArgs a{reinterpret_cast<const int64_t*>(taps), ntaps, chans, xstep, w, ocb};
  using Fn = void (*)(const nhwc::ConvArgs&, const float*, const int64_t*, int64_t, float*);
  Fn fn = avx512 ? (nv == 4   ? &nhwc::avx512::conv_plane<4, 6>
                    : nv == 2 ? &nhwc::avx512::conv_plane<2, 12>
                              : &nhwc::avx512::conv_plane<1, 16>)
                 : (nv == 2 ? &nhwc::avx2::conv_plane<2, 6> : &nhwc::avx2::conv_plane<1, 12>);
  const int64_t* p = reinterpret_cast<const int64_t*>(pix);
  const double t0 = now();
  for (long i = 0; i < calls; ++i) fn(a, x, p, npix, out);
  *seconds = now() - t0;
  return 2.0 * npix * nv * (avx512 ? 16 : 8) * chans * ntaps * calls;
}
"""

# (name, batch, C_in, H=W, C_out, k, stride, padding): deep layers of ResNet-18 and VGG.
LAYERS = [
    ("resnet-cifar layer1", 32, 64, 32, 64, 3, 1, 1),
    ("resnet18 layer2", 8, 128, 28, 128, 3, 1, 1),
    ("resnet18 layer3", 32, 256, 14, 256, 3, 1, 1),
    ("resnet18 layer4", 32, 512, 7, 512, 3, 1, 1),
    ("resnet18 layer2 down", 8, 64, 56, 128, 3, 2, 1),
]


def build_driver() -> ctypes.CDLL:
    """Compiles DRIVER against csrc into a temporary shared library."""
    tmp = Path(tempfile.mkdtemp(prefix="cnnext_kernel_"))
    src, lib = tmp / "driver.cpp", tmp / "driver.so"
    src.write_text(DRIVER)
    cmd = [
        "c++",
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-Wno-psabi",
        f"-I{ROOT / 'csrc'}",
        str(src),
        "-o",
    ]
    subprocess.run([*cmd, str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dbl, lng, ptr = ctypes.c_double, ctypes.c_long, ctypes.c_void_p
    dll.fma_peak.restype = dbl
    dll.fma_peak.argtypes = [ctypes.c_int, lng, ptr, ctypes.POINTER(dbl)]
    dll.conv_rows.restype = dbl
    dll.conv_rows.argtypes = [ctypes.c_int, ctypes.c_int, lng, ptr, lng, lng, lng, ptr, ptr, lng]
    dll.conv_rows.argtypes += [lng, ptr, ctypes.POINTER(dbl)]
    dll.conv_planes.restype = dbl
    dll.conv_planes.argtypes = [ctypes.c_int, ctypes.c_int, lng, ptr, lng, lng, lng, ptr, ptr]
    dll.conv_planes.argtypes += [lng, ptr, lng, ptr, ctypes.POINTER(dbl)]
    return dll


def peak_gflops(dll: ctypes.CDLL, avx512: bool, seconds: float = 0.2) -> float:
    sink = torch.full((64,), 1e-7)
    t = ctypes.c_double()
    iters = 100_000
    flops = dll.fma_peak(int(avx512), iters, sink.data_ptr(), ctypes.byref(t))
    iters = max(iters, int(iters * seconds / max(t.value, 1e-9)))
    flops = dll.fma_peak(int(avx512), iters, sink.data_ptr(), ctypes.byref(t))
    return flops / t.value / 1e9


def kernel_gflops(dll: ctypes.CDLL, avx512: bool, layer: tuple, seconds: float = 0.2) -> float:
    """The kernel the op runs for one output row of the layer (``conv_row``), or for the whole
    plane when it is narrower than a register block (``conv_plane``), on its input and one
    filter block (the NHWC pixel stride padded to an odd number of cache lines, as the op packs
    it)."""
    _, _, c_in, size, c_out, k, stride, pad = layer
    lanes = 16 if avx512 else 8
    # The op's block width (cpu_nhwc.h, conv_width): four vectors for 128-256 channels of a 3x3.
    four = (
        avx512 and c_out >= 4 * lanes and c_in >= 128 and c_in * k * k * 4 * lanes * 4 <= 576 << 10
    )
    nv = 4 if four else 2 if c_out >= 2 * lanes else 1
    ocb = nv * lanes
    wo = (size + 2 * pad - k) // stride + 1
    cols = (wo - 1) * stride + k
    pix = ((c_in + 15) // 16 | 1) * 16
    row = cols * pix
    plane = wo < (12 if avx512 else 6)
    rows = (wo - 1) * stride + k if plane else k
    x = torch.randn(rows * row + 16)
    w = torch.randn(k * k * c_in * ocb) * 0.01
    out = torch.empty(wo * wo * ocb)
    taps = torch.tensor([ky * row + kx * pix for ky in range(k) for kx in range(k)])
    offsets = torch.tensor(
        [y * stride * row + c * stride * pix for y in range(wo) for c in range(wo)]
    )
    t = ctypes.c_double()

    def run(calls: int) -> float:
        if plane:
            return dll.conv_planes(int(avx512), nv, calls, taps.data_ptr(), k * k, c_in,
                                   stride * pix, x.data_ptr(), w.data_ptr(), ocb,
                                   offsets.data_ptr(), wo * wo, out.data_ptr(),
                                   ctypes.byref(t))  # fmt: skip
        return dll.conv_rows(int(avx512), nv, calls, taps.data_ptr(), k * k, c_in, stride * pix,
                             x.data_ptr(), w.data_ptr(), ocb, wo, out.data_ptr(),
                             ctypes.byref(t))  # fmt: skip

    flops = run(10)
    calls = max(10, int(10 * seconds / max(t.value, 1e-9)))
    flops = run(calls)
    return flops / t.value / 1e9


def warm_heap() -> None:
    """Raises glibc's mmap threshold to its 32 MiB cap (see the module docstring)."""
    big = torch.empty(32 << 20, dtype=torch.uint8)
    big.fill_(0)
    del big


def paired_min_ms(
    ours: Callable[[], object], ref: Callable[[], object], seconds: float
) -> tuple[float, float]:
    """Both called alternately, call by call, for `seconds` (at least 3 pairs): the fastest call
    of each, in ms. On a shared machine both see the same load; the minimum is the call the
    scheduler left alone the most."""
    ours(), ref()
    t_ours, t_ref = [], []
    end = time.perf_counter() + seconds
    while len(t_ours) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        ref()
        t_ours.append(t1 - t0)
        t_ref.append(time.perf_counter() - t1)
    return min(t_ours) * 1e3, min(t_ref) * 1e3


def layer_rows(layer: tuple, threads: int, rounds: int, seconds: float) -> list[str]:
    name, n, c_in, size, c_out, k, stride, pad = layer
    out_size = (size + 2 * pad - k) // stride + 1
    flops = 2 * n * c_out * out_size**2 * c_in * k * k
    lines = []
    for layout in ("nchw", "nhwc"):
        x = torch.randn(n, c_in, size, size)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5

        def ours(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
            return cnnext.ops.conv2d(x, w, stride=stride, padding=pad, algo="direct")

        def ref(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
            return F.conv2d(x, w, stride=stride, padding=pad)

        torch.testing.assert_close(ours(), ref(), rtol=1e-3, atol=1e-3)
        mo, mr = paired_min_ms(ours, ref, rounds * seconds)
        lines.append(
            f"{name:<22}{n:>4}{layout:>6}{threads:>4} | {mo:>9.3f}{flops / mo / 1e6:>8.1f}"
            f" | {mr:>9.3f}{flops / mr / 1e6:>8.1f} | {mr / mo:>6.2f}x"
        )
    return lines


def _cpu_or_wall(clock: str) -> Callable[[], float]:
    # Process CPU time: at one thread it excludes the time other processes held the core.
    return time.process_time if clock == "cpu" else time.perf_counter


def _paired(ours: Callable[[], object], ref: Callable[[], object], seconds: float,
            clock: Callable[[], float]) -> tuple[float, float, int]:  # fmt: skip
    """The fastest call of each in ms, called alternately (at least 3 pairs, at most 60)."""
    ours(), ref()
    t_ours, t_ref = [], []
    end = time.perf_counter() + seconds
    while len(t_ours) < 3 or (time.perf_counter() < end and len(t_ours) < 60):
        t0 = clock()
        ours()
        t1 = clock()
        ref()
        t2 = clock()
        t_ours.append(t1 - t0)
        t_ref.append(t2 - t1)
    return min(t_ours) * 1e3, min(t_ref) * 1e3, len(t_ours)


def _call(conv: Callable, x: torch.Tensor, w: torch.Tensor, conf: dict, grad: torch.Tensor,
          bwd: bool) -> None:  # fmt: skip
    y = conv(x, w, **conf)
    if bwd:
        torch.autograd.grad(y, (x, w), grad)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def suite_layers(args: argparse.Namespace) -> None:
    """The suite's conv layers with C_in >= 64 (benchmarks/shapes.py), NCHW:
    ``cnnext.ops.conv2d(algo=...)`` against ``F.conv2d``, forward or forward+backward."""
    from benchmarks.shapes import CONV_LAYERS

    layers = [lay for lay in CONV_LAYERS if lay.c_in >= 64 and args.layers in lay.id]
    clock = _cpu_or_wall(args.clock)
    print(f"\nsuite layers: cnnext ({args.algo}) vs oneDNN, fastest call, {args.clock} clock")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for n in [int(b) for b in args.batches.split(",")]:
            for pass_ in args.passes.split(","):
                ratios = []
                for lay in layers:
                    x = torch.randn(n, lay.c_in, lay.size, lay.size)
                    w = torch.randn(lay.c_out, lay.c_in // lay.groups, lay.k, lay.k)
                    w /= lay.reduction**0.5
                    conf = dict(stride=lay.stride, padding=lay.padding, groups=lay.groups)
                    bwd = pass_ != "fwd"
                    xg, wg = x.requires_grad_(bwd), w.requires_grad_(bwd)
                    grad = torch.randn(F.conv2d(x, w, **conf).shape)
                    ours = partial(_call, partial(cnnext.ops.conv2d, algo=args.algo), xg, wg, conf,
                                   grad, bwd)  # fmt: skip
                    ref = partial(_call, F.conv2d, xg, wg, conf, grad, bwd)
                    mo, mr, calls = _paired(ours, ref, args.seconds, clock)
                    ratios.append(mr / mo)
                    print(f"{lay.id:<34}{n:>4}{threads:>3} {pass_:<8}| {mo:>9.3f} | {mr:>9.3f}"
                          f" | {mr / mo:>5.2f}x  ({calls} calls)", flush=True)  # fmt: skip
                print(f"geomean n={n} threads={threads} {pass_}: {_geomean(ratios):.3f}x "
                      f"(min {min(ratios):.2f}x)\n", flush=True)  # fmt: skip


def fused_eval(args: argparse.Namespace) -> None:
    """``nn.ConvBNReLU2d`` in eval under no_grad against eager conv -> bn -> relu
    (``to_modules()``) on the suite's fused layers (benchmarks/shapes.py), NCHW."""
    from benchmarks.shapes import FUSED_LAYERS

    clock = _cpu_or_wall(args.clock)
    print(f"\nConvBNReLU2d eval ({args.algo}) vs eager, fastest call, {args.clock} clock")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for n in [int(b) for b in args.batches.split(",")]:
            ratios = []
            for lay in [lay for lay in FUSED_LAYERS if args.layers in lay.id]:
                block = cnnext.nn.ConvBNReLU2d(lay.c_in, lay.c_out, lay.k, stride=lay.stride,
                                               padding=lay.padding, algo=args.algo)  # fmt: skip
                block = block.eval()
                with torch.no_grad():
                    block[1].running_mean.uniform_(-1, 1)
                    block[1].running_var.uniform_(0.5, 2)
                    eager = block.to_modules().eval()
                    x = torch.randn(n, lay.c_in, lay.size, lay.size)
                    torch.testing.assert_close(block(x), eager(x), rtol=1e-3, atol=1e-3)
                    mo, mr, calls = _paired(
                        partial(block, x), partial(eager, x), args.seconds, clock
                    )
                ratios.append(mr / mo)
                print(f"{lay.id:<34}{n:>4}{threads:>3} | {mo:>9.3f} | {mr:>9.3f} | "
                      f"{mr / mo:>5.2f}x  ({calls} calls)", flush=True)  # fmt: skip
            print(f"geomean n={n} threads={threads}: {_geomean(ratios):.3f}x "
                  f"(min {min(ratios):.2f}x)\n", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--isa", choices=["avx512", "avx2"], default="avx512")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.3, help="per timing")
    parser.add_argument("--layers", default="", help="substring filter on layer names")
    parser.add_argument("--kernel-rounds", type=int, default=200, help="short isolated runs")
    parser.add_argument("--no-op", action="store_true", help="kernel and peak only")
    parser.add_argument("--suite", action="store_true", help="the suite's deep layers instead")
    parser.add_argument("--fused", action="store_true", help="ConvBNReLU2d eval vs eager instead")
    parser.add_argument("--batches", default="8,32", help="--suite, --fused")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="--suite")
    parser.add_argument("--algo", default="auto", help="--suite, --fused")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="--suite, --fused")
    args = parser.parse_args()
    if args.suite or args.fused:
        print(f"cnnext: {Path(cnnext.__file__).parent}")
        warm_heap()
        return suite_layers(args) if args.suite else fused_eval(args)
    avx512 = args.isa == "avx512"
    layers = [lay for lay in LAYERS if args.layers in lay[0]]
    print(f"cnnext: {Path(cnnext.__file__).parent}  (run with PYTHONPATH=. for this checkout)")
    dll = build_driver()
    warm_heap()
    torch.set_num_threads(1)
    # Peak and kernel interleaved, one thread, in short runs (2 ms: shorter than a scheduler
    # slice, so that some runs are not preempted): on a shared machine the best run approaches
    # the uncontended speed, the median shows what the load left. The ratio is of the medians:
    # on a quiet host the probe's best run reads 5-15% above its median now and then (clock
    # boosts of a 2 ms run), which would make best/best a ratio to an outlier.
    print(f"kernel in isolation ({args.isa}, 1 thread), GFLOP/s over {args.kernel_rounds} runs")
    head = f"{'peak med':>9} {'best':>7} {'kernel med':>11} {'best':>7} {'med/med':>8}"
    print(f"{'layer':<22} {head}")
    for layer in layers:
        peaks, kerns = [], []
        for _ in range(args.kernel_rounds):
            peaks.append(peak_gflops(dll, avx512, 0.002))
            kerns.append(kernel_gflops(dll, avx512, layer, 0.002))
        pm, km = statistics.median(peaks), statistics.median(kerns)
        pb, kb = max(peaks), max(kerns)
        print(f"{layer[0]:<22} {pm:>9.1f} {pb:>7.1f} {km:>11.1f} {kb:>7.1f} {100 * km / pm:>7.1f}%")
    if args.no_op:
        return
    print("\nwhole layer: cnnext direct vs oneDNN (F.conv2d), ms and GFLOP/s, fastest of calls")
    print(f"{'layer':<22}{'n':>4}{'layout':>6}{'thr':>4} | {'cnnext':>9}{'GF/s':>8} | "
          f"{'oneDNN':>9}{'GF/s':>8} | {'ratio':>7}")  # fmt: skip
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for layer in layers:
            for line in layer_rows(layer, threads, args.rounds, args.seconds):
                print(line)


if __name__ == "__main__":
    main()
