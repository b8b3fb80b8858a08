// int-ok-file: loop counters over register-block template constants (RB, NV, kBases)
// Register-blocked microkernels of the NHWC direct convolution (cpu_nhwc.h), written once and
// compiled once per ISA: cpu_nhwc.h includes this file twice, with CNNEXT_NHWC_ISA (namespace),
// CNNEXT_NHWC_VEC (a vector struct of common/cpu_vec.h) and CNNEXT_NHWC_TARGET defined. Each
// function carries the target attribute itself: GCC refuses to inline an intrinsic into a
// function of another target, even one that is later inlined into the right one.
// The kernel template has no include guard, on purpose; the argument structs have one.

#include <algorithm>
#include <cstdint>

#ifndef CNNEXT_NHWC_ARGS
#define CNNEXT_NHWC_ARGS
namespace cnnext::nhwc {

// The conv kernel reduces over channel blocks of this many channels, all taps of one block
// before the next: a block of a 3-row window of 12-16 pixels stays in L1 (3 x 16 pixels x 128
// channels is 24 KiB; deep layers' whole windows do not fit: ResNet layer4's 512 channels are 96
// KiB). Longer blocks run fewer tap loops, each ending in a mispredicted exit: 128 measured 2-5%
// faster than 64 on ResNet-18's layers 2-4 (benchmarks/results/direct_cpu_kernel-*.txt).
constexpr int64_t kChanBlock = 128;

struct ConvArgs {
  const int64_t* taps;  // offsets of the filter taps from the window origin, in floats
  int64_t ntaps, chans;
  int64_t xstep;  // floats from one output pixel's window to the next one's
  // Filter value (t, c, o) of channel block cb = c / kChanBlock, holding nb channels, sits at
  // w[(cb * kChanBlock * ntaps + t * nb + c % kChanBlock) * NV * lanes + o] for a kernel of NV
  // vectors (a block of ocb outputs narrower than ocb is packed at its own vector count).
  const float* w;
  int64_t ocb;  // floats between output pixels in `out`
  // A subset of the packed filter's taps (the rest would multiply a zero border): tap t is the
  // filter's tap wtaps[t] of wntaps. Null: the filter's own ntaps taps, in order.
  const int64_t* wtaps = nullptr;
  int64_t wntaps = 0;
  // conv_plane's pixel j goes to out + opix[j] (null: out + j * ocb).
  const int64_t* opix = nullptr;
};

struct GwArgs {
  int64_t nrows, wo;
  int64_t xrow, xstep;  // floats between output rows' and output pixels' windows
  int64_t gstep;        // floats between grad_output pixels
  int64_t ocb;
  // Samples summed in one call, and floats between their windows and grad_output planes: small
  // planes (4x4: 16 pixels) would otherwise load and store the accumulators every few pixels.
  int64_t nsamp = 1, xsample = 0, gsample = 0;
  int64_t grow = 0;  // floats between grad_output rows (0: wo * gstep; more: a span of columns)
};

}  // namespace cnnext::nhwc
#endif

namespace cnnext::nhwc::CNNEXT_NHWC_ISA {

using V = CNNEXT_NHWC_VEC;
using Reg = V::Reg;
constexpr int kLanes = V::kLanes;

#define CNNEXT_NHWC_FN CNNEXT_NHWC_TARGET inline __attribute__((always_inline))

// out[j * ocb + o] = sum over taps t and channels c of x[j * xstep + taps[t] + c] * w(t, c, o)
// for RB output pixels j and NV vectors of output channels o: RB * NV accumulators, one broadcast
// input value (an FMA's memory operand) per FMA, NV filter loads per channel and tap. The channel
// loop is unrolled by 4 (channel offsets in the addresses' displacements): its pointer and
// counter updates otherwise take issue slots from the FMAs, 5% measured.
template <int NV, int RB>
CNNEXT_NHWC_FN void conv_block(const ConvArgs& a, const float* x, float* out) {
  Reg acc[RB][NV];
  for (int j = 0; j < RB; ++j) {
    for (int v = 0; v < NV; ++v) acc[j][v] = V::zero();
  }
  // Pixel j = 3m + r is read at base[m] + r * xstep: one base register per three pixels, the
  // rest in the address (index * 4 or * 8), which leaves the loop enough general registers.
  constexpr int kBases = (RB + 2) / 3;
  constexpr int kW = NV * kLanes;
  const int64_t xstep = a.xstep;
  const int64_t wntaps = a.wtaps != nullptr ? a.wntaps : a.ntaps;
  for (int64_t c0 = 0; c0 < a.chans; c0 += kChanBlock) {
    const int64_t nc = std::min<int64_t>(kChanBlock, a.chans - c0);
    for (int64_t t = 0; t < a.ntaps; ++t) {
      const float* w = a.w + (c0 * wntaps + (a.wtaps != nullptr ? a.wtaps[t] : t) * nc) * kW;
      const float* base[kBases];
      for (int m = 0; m < kBases; ++m) base[m] = x + a.taps[t] + c0 + 3 * m * xstep;
      int64_t c = 0;
      for (; c + 4 <= nc; c += 4, w += 4 * kW) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          Reg wv[NV];
          for (int v = 0; v < NV; ++v) wv[v] = V::load(w + u * kW + v * kLanes);
          for (int j = 0; j < RB; ++j) {
            const Reg b = V::broadcast(base[j / 3] + (j % 3) * xstep + c + u);
            for (int v = 0; v < NV; ++v) acc[j][v] = V::fma(wv[v], b, acc[j][v]);
          }
        }
      }
      for (; c < nc; ++c, w += kW) {
        Reg wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = V::load(w + v * kLanes);
        for (int j = 0; j < RB; ++j) {
          const Reg b = V::broadcast(base[j / 3] + (j % 3) * xstep + c);
          for (int v = 0; v < NV; ++v) acc[j][v] = V::fma(wv[v], b, acc[j][v]);
        }
      }
    }
  }
  for (int j = 0; j < RB; ++j) {
    for (int v = 0; v < NV; ++v) V::store(out + j * a.ocb + v * kLanes, acc[j][v]);
  }
}

template <int NV, int R>
CNNEXT_NHWC_FN void conv_tail(int64_t rem, const ConvArgs& a, const float* x, float* out) {
  if constexpr (R > 0) {
    if (rem == R) return conv_block<NV, R>(a, x, out);
    conv_tail<NV, R - 1>(rem, a, x, out);
  }
}

// One output row of `wo` pixels in the fewest blocks of at most RB, sizes differing by at most
// one: 14 pixels run as 7 + 7, not 12 + 2 (a 2-pixel block does 2 FMAs per filter load).
template <int NV, int RB>
CNNEXT_NHWC_TARGET void conv_row(const ConvArgs& a, const float* x, int64_t wo, float* out) {
  const int64_t blocks = (wo + RB - 1) / RB, size = wo / blocks, longer = wo % blocks;
  int64_t ox = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t rb = size + (i < longer ? 1 : 0);
    if (rb == RB) {
      conv_block<NV, RB>(a, x + ox * a.xstep, out + ox * a.ocb);
    } else {
      conv_tail<NV, RB - 1>(rb, a, x + ox * a.xstep, out + ox * a.ocb);
    }
    ox += rb;
  }
}

// conv_block over RB pixels anywhere in the plane, pixel j's window at x + pix[j]: planes
// narrower than a register block (ResNet's 7x7 and 4x4) run as one sequence of pixels, not as
// short rows. One pointer per pixel: the loop spills a register or two, still FMA-bound. Unrolled
// as conv_block.
template <int NV, int RB>
CNNEXT_NHWC_FN void conv_gather_block(const ConvArgs& a, const float* x, const int64_t* pix,
                                      const int64_t* opix, float* out) {
  Reg acc[RB][NV];
  for (int j = 0; j < RB; ++j) {
    for (int v = 0; v < NV; ++v) acc[j][v] = V::zero();
  }
  constexpr int kW = NV * kLanes;
  const int64_t wntaps = a.wtaps != nullptr ? a.wntaps : a.ntaps;
  for (int64_t c0 = 0; c0 < a.chans; c0 += kChanBlock) {
    const int64_t nc = std::min<int64_t>(kChanBlock, a.chans - c0);
    for (int64_t t = 0; t < a.ntaps; ++t) {
      const float* w = a.w + (c0 * wntaps + (a.wtaps != nullptr ? a.wtaps[t] : t) * nc) * kW;
      const float* px[RB];
      for (int j = 0; j < RB; ++j) px[j] = x + pix[j] + a.taps[t] + c0;
      int64_t c = 0;
      for (; c + 4 <= nc; c += 4, w += 4 * kW) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          Reg wv[NV];
          for (int v = 0; v < NV; ++v) wv[v] = V::load(w + u * kW + v * kLanes);
          for (int j = 0; j < RB; ++j) {
            const Reg b = V::broadcast(px[j] + c + u);
            for (int v = 0; v < NV; ++v) acc[j][v] = V::fma(wv[v], b, acc[j][v]);
          }
        }
      }
      for (; c < nc; ++c, w += kW) {
        Reg wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = V::load(w + v * kLanes);
        for (int j = 0; j < RB; ++j) {
          const Reg b = V::broadcast(px[j] + c);
          for (int v = 0; v < NV; ++v) acc[j][v] = V::fma(wv[v], b, acc[j][v]);
        }
      }
    }
  }
  for (int j = 0; j < RB; ++j) {
    float* o = out + (opix != nullptr ? opix[j] : j * a.ocb);
    for (int v = 0; v < NV; ++v) V::store(o + v * kLanes, acc[j][v]);
  }
}

template <int NV, int R>
CNNEXT_NHWC_FN void gather_tail(int64_t rem, const ConvArgs& a, const float* x, const int64_t* pix,
                                const int64_t* opix, float* out) {
  if constexpr (R > 0) {
    if (rem == R) return conv_gather_block<NV, R>(a, x, pix, opix, out);
    gather_tail<NV, R - 1>(rem, a, x, pix, opix, out);
  }
}

// `npix` pixels of a plane (windows at x + pix[j]) in balanced blocks, as conv_row.
template <int NV, int RB>
CNNEXT_NHWC_TARGET void conv_plane(const ConvArgs& a, const float* x, const int64_t* pix,
                                   int64_t npix, float* out) {
  const int64_t blocks = (npix + RB - 1) / RB, size = npix / blocks, longer = npix % blocks;
  int64_t j = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t rb = size + (i < longer ? 1 : 0);
    const int64_t* opix = a.opix != nullptr ? a.opix + j : nullptr;
    float* o = a.opix != nullptr ? out : out + j * a.ocb;
    if (rb == RB) {
      conv_gather_block<NV, RB>(a, x, pix + j, opix, o);
    } else {
      gather_tail<NV, RB - 1>(rb, a, x, pix + j, opix, o);
    }
    j += rb;
  }
}

// acc[i * ocb + o] += sum over samples s < nsamp, rows r < nrows and columns q < wo of
//   x[s * xsample + r * xrow + q * xstep + i] * go[s * gsample + (r * wo + q) * gstep + o]
// for RC input channels i and NV vectors of output channels o (grad_weight of one tap): the
// same register block as conv_block with the roles of pixels and channels swapped. Columns
// unrolled by 2, as conv_block's channels (2-11% measured).
template <int NV, int RC>
CNNEXT_NHWC_FN void gw_block(const GwArgs& a, const float* x, const float* go, float* acc_mem) {
  Reg acc[RC][NV];
  for (int i = 0; i < RC; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = V::load(acc_mem + i * a.ocb + v * kLanes);
  }
  const int64_t grow = a.grow != 0 ? a.grow : a.wo * a.gstep;
  for (int64_t sr = 0, r = 0; sr < a.nsamp * a.nrows; ++sr, ++r) {
    if (r == a.nrows) r = 0, x += a.xsample, go += a.gsample;
    const float* __restrict__ xr = x + r * a.xrow;
    const float* __restrict__ gr = go + r * grow;
    int64_t q = 0;
    for (; q + 2 <= a.wo; q += 2) {
#pragma GCC unroll 2
      for (int u = 0; u < 2; ++u) {
        Reg gv[NV];
        for (int v = 0; v < NV; ++v) gv[v] = V::load(gr + (q + u) * a.gstep + v * kLanes);
        for (int i = 0; i < RC; ++i) {
          const Reg b = V::broadcast(xr + (q + u) * a.xstep + i);
          for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(gv[v], b, acc[i][v]);
        }
      }
    }
    for (; q < a.wo; ++q) {
      Reg gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = V::load(gr + q * a.gstep + v * kLanes);
      for (int i = 0; i < RC; ++i) {
        const Reg b = V::broadcast(xr + q * a.xstep + i);
        for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(gv[v], b, acc[i][v]);
      }
    }
  }
  for (int i = 0; i < RC; ++i) {
    for (int v = 0; v < NV; ++v) V::store(acc_mem + i * a.ocb + v * kLanes, acc[i][v]);
  }
}

template <int NV, int R>
CNNEXT_NHWC_FN void gw_tail(int64_t rem, const GwArgs& a, const float* x, const float* go,
                            float* acc) {
  if constexpr (R > 0) {
    if (rem == R) return gw_block<NV, R>(a, x, go, acc);
    gw_tail<NV, R - 1>(rem, a, x, go, acc);
  }
}

// `chans` input channels from x[0] on, in the fewest blocks of at most RC, balanced as in
// conv_row.
template <int NV, int RC>
CNNEXT_NHWC_TARGET void gw_run(const GwArgs& a, int64_t chans, const float* x, const float* go,
                               float* acc) {
  const int64_t blocks = (chans + RC - 1) / RC, size = chans / blocks, longer = chans % blocks;
  int64_t c = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t rc = size + (i < longer ? 1 : 0);
    if (rc == RC) {
      gw_block<NV, RC>(a, x + c, go, acc + c * a.ocb);
    } else {
      gw_tail<NV, RC - 1>(rc, a, x + c, go, acc + c * a.ocb);
    }
    c += rc;
  }
}

#undef CNNEXT_NHWC_FN

}  // namespace cnnext::nhwc::CNNEXT_NHWC_ISA
