// Direct convolution for layers with many channels (C_in / groups and C_out / groups >= 16),
// float32, AVX-512 or AVX2: the forward, grad_input and grad_weight.
//
// The input is read as NHWC with zero borders (channels_last input without padding in place,
// anything else copied once per call), the filter packed into blocks of one, two or four vectors
// of output channels ([block][channel block][tap][channel][ocb], zero past the last channel). A
// microkernel keeps a register block of RB output pixels along a row x ocb channels in RB * NV
// accumulators and does one FMA per broadcast input value (cpu_nhwc_kernels.h). grad_input is
// the same kernel on the zero-bordered grad_output with the flipped, transposed filter, once per
// stride phase (only the taps that reach it: no products with the zeros between strided
// outputs); grad_weight swaps pixels and channels: RC input channels x ocb output channels
// reduced over pixels. A tap that reads only the zero border is skipped, as oneDNN does (pixels
// of narrow planes in classes by their taps, rows by their tap rows, grad_weight's calls cut to
// the rows and columns with data). Work is split over samples, groups, channel blocks and rows;
// each output element is summed by one task in a fixed order, so results do not depend on the
// thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"
#include "common/params.h"

#ifdef CNNEXT_X86_COPIES
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
#undef CNNEXT_NHWC_ISA
#undef CNNEXT_NHWC_VEC
#undef CNNEXT_NHWC_TARGET
#endif

namespace cnnext::nhwc {

using ConvRowFn = void (*)(const ConvArgs&, const float*, int64_t, float*);
using ConvPlaneFn = void (*)(const ConvArgs&, const float*, const int64_t*, int64_t, float*);
using GwRunFn = void (*)(const GwArgs&, int64_t, const float*, const float*, float*);

// One ISA's kernels, indexed by the number of channel vectors (1 or 2). Block sizes: ~24
// accumulators of 32 zmm registers (more lost 17% to register pressure in a first measurement),
// 12 of 16 ymm with AVX2. Loads, not FMAs, bound the 2 x 12 loop (14 loads per 24 FMAs): a probe
// of it with every operand in L1 runs at 82-84% of the register-only FMA peak on a Sapphire
// Rapids core, 85% at 3 x 8 (11 loads), 90% at 4 x 6 (10). A 3 x 8 block for 96+ channels ran
// the kernel 2-4% faster alone but whole layers only 0-5% at 1 thread, and its 48-wide blocks
// of 256/512 channels (5 x 48 + 16, ...) split unevenly over 2 threads on narrow planes: not
// taken. 4 x 6 runs where its 64-wide filter blocks stay small (conv_width); 3 x 8 only for a
// last block of 48.
struct Kernels {
  int64_t lanes = 0;
  int64_t row_block = 0;       // pixels per block with two vectors: narrower planes run flattened
  int64_t gw_chans[3] = {};    // gw_run's input channels per register block
  ConvRowFn conv_row[5] = {};  // up to four vectors (AVX-512: 32 registers); AVX2 up to two
  ConvPlaneFn conv_plane[5] = {};
  GwRunFn gw_run[3] = {};
};

inline const Kernels* kernels_for(CpuIsa isa) {
#ifdef CNNEXT_X86_COPIES
  static const Kernels k512{16,
                            12,
                            {0, 16, 12},
                            {nullptr, &avx512::conv_row<1, 16>, &avx512::conv_row<2, 12>,
                             &avx512::conv_row<3, 8>, &avx512::conv_row<4, 6>},
                            {nullptr, &avx512::conv_plane<1, 16>, &avx512::conv_plane<2, 12>,
                             &avx512::conv_plane<3, 8>, &avx512::conv_plane<4, 6>},
                            {nullptr, &avx512::gw_run<1, 16>, &avx512::gw_run<2, 12>}};
  static const Kernels k256{8,
                            6,
                            {0, 12, 6},
                            {nullptr, &avx2::conv_row<1, 12>, &avx2::conv_row<2, 6>},
                            {nullptr, &avx2::conv_plane<1, 12>, &avx2::conv_plane<2, 6>},
                            {nullptr, &avx2::gw_run<1, 12>, &avx2::gw_run<2, 6>}};
  if (isa == CpuIsa::kAvx512) return &k512;
  if (isa == CpuIsa::kAvx2) return &k256;
#endif
  (void)isa;
  return nullptr;
}

#ifdef CNNEXT_X86_COPIES
namespace avx512 {

// The zero-masked forms with every lane set are the plain instructions; GCC 12's unmasked
// intrinsics pass an undefined vector that -Wmaybe-uninitialized reports once inlined.
constexpr __mmask16 kAll = 0xffff;
constexpr __mmask8 kAll8 = 0xff;

// r[i], 16 rows of 16 floats, becomes its transpose: r[j] holds what was column j.
CNNEXT_TARGET_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int64_t i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_maskz_unpacklo_ps(kAll, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_ps(kAll, r[2 * i], r[2 * i + 1]);
  }
  for (int64_t i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, b, d));
  }
  for (int64_t i = 0; i < 4; ++i) {
    t[i] = _mm512_maskz_shuffle_f32x4(kAll, u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_maskz_shuffle_f32x4(kAll, u[i], u[4 + i], 0xdd);
    t[8 + i] = _mm512_maskz_shuffle_f32x4(kAll, u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_maskz_shuffle_f32x4(kAll, u[8 + i], u[12 + i], 0xdd);
  }
  for (int64_t i = 0; i < 8; ++i) {
    r[i] = _mm512_maskz_shuffle_f32x4(kAll, t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_maskz_shuffle_f32x4(kAll, t[i], t[8 + i], 0xdd);
  }
}

CNNEXT_TARGET_AVX512 inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}

// d[p * pix + ch] = src[ch * cstride + p] for p < npix, ch < chans (channels up to the next
// multiple of 16 are written as zeros: pix is a multiple of 16 at least chans). One NCHW row into
// NHWC through 16 x 16 register transposes; scalar, this copy took ~14% of a 64-channel layer.
CNNEXT_TARGET_AVX512 inline void nchw_row_to_nhwc(const float* src, int64_t cstride, int64_t chans,
                                                  int64_t npix, float* d, int64_t pix) {
  for (int64_t c0 = 0; c0 < chans; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, chans - c0);
    for (int64_t p0 = 0; p0 < npix; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, npix - p0);
      const __mmask16 m = first_lanes(np);
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] =
            i < nc ? _mm512_maskz_loadu_ps(m, src + (c0 + i) * cstride + p0) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t p = 0; p < np; ++p) _mm512_storeu_ps(d + (p0 + p) * pix + c0, r[p]);
    }
  }
}

// store_row's NCHW case (unit stride along the row) with the same arithmetic: t * s + b (a
// multiply, then an add), then std::max(v, 0) (max(0, v) returns v when v is NaN), through 16 x
// 16 transposes instead of one strided tile read per element.
CNNEXT_TARGET_AVX512 inline void store_row_nchw(const float* tile, int64_t ocb, int64_t wo,
                                                int64_t nout, float* dst, int64_t cstride,
                                                const float* scale, const float* bias, bool relu) {
  const bool copy = scale == nullptr && bias == nullptr && !relu;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t o0 = 0; o0 < nout; o0 += 16) {
    const int64_t no = std::min<int64_t>(16, nout - o0);
    const __mmask16 om = first_lanes(no);
    const __m512 s = scale != nullptr ? _mm512_maskz_loadu_ps(om, scale + o0) : _mm512_set1_ps(1);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(om, bias + o0) : zero;
    for (int64_t x0 = 0; x0 < wo; x0 += 16) {
      const int64_t nx = std::min<int64_t>(16, wo - x0);
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        if (i >= nx) {
          r[i] = zero;
          continue;
        }
        // The tile row holds ocb >= o0 + 16 floats (ocb is a multiple of 16).
        __m512 v = _mm512_loadu_ps(tile + (x0 + i) * ocb + o0);
        if (!copy) v = _mm512_add_ps(_mm512_mul_ps(v, s), b);
        if (relu) v = _mm512_maskz_max_ps(kAll, zero, v);
        r[i] = v;
      }
      transpose16(r);
      const __mmask16 xm = first_lanes(nx);
      for (int64_t o = 0; o < no; ++o)
        _mm512_mask_storeu_ps(dst + (o0 + o) * cstride + x0, xm, r[o]);
    }
  }
}

}  // namespace avx512
#endif

// Whether this kernel takes a layer; the rest (few channels, double, no SIMD) stays on the
// plane-based kernel of cpu.cpp.
inline bool eligible(const Conv2dParams& p, at::ScalarType dtype, CpuIsa isa) {
  return dtype == at::kFloat && kernels_for(isa) != nullptr && p.c_in_per_group() >= 16 &&
         p.c_out_per_group() >= 16;
}

// Vectors of floats on 64-byte (cache line) boundaries: a packed filter at malloc's 16-byte
// alignment splits every vector load over two lines, 10-14% slower measured.
template <typename T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const {
    return true;
  }
};
using Packed = std::vector<float, LineAllocator<float>>;

// Element strides of a 3D/4D activation: (n, c, h, w); n is 0 for a 3D tensor.
struct Strides {
  int64_t n = 0, c = 0, h = 0, w = 0;
};
inline Strides strides_of(const at::Tensor& t) {
  const int64_t off = t.dim() == 4 ? 1 : 0;
  return {off ? t.stride(0) : 0, t.stride(off), t.stride(off + 1), t.stride(off + 2)};
}

// Output channels per block: two vectors when the group has that many.
inline int64_t block_width(const Kernels& k, int64_t outs) {
  return outs >= 2 * k.lanes ? 2 * k.lanes : k.lanes;
}

// Output channels per block of the conv kernel (forward and grad_input, which reduces over
// `chans` channels and `ntaps` taps): four vectors x 6 pixels (10 loads per 24 FMAs, not 14)
// where a 64-wide filter block stays small, 128-256 channels of a 3x3 (<= 576 KiB, read from L2
// by every register block). Against 2 x 12, alternating in one process, 1 / 2 threads: ResNet's
// 128-channel layers +9-15% / 0-5%, 256-channel 8x8 and 14x14 +3-4% / 1-8%; 64 channels at 56x56
// lost 6-8% and 512 channels (1.2 MiB blocks) 0-6%: those keep block_width. The last block of
// 16-48 outputs runs the one- to three-vector kernel.
inline int64_t conv_width(const Kernels& k, int64_t outs, int64_t chans, int64_t ntaps) {
  constexpr int64_t kMaxBlockBytes = int64_t(576) << 10;
  const int64_t wide = 4 * k.lanes;
  if (k.conv_row[4] != nullptr && outs >= wide && chans >= 128 &&
      chans * ntaps * wide * static_cast<int64_t>(sizeof(float)) <= kMaxBlockBytes)
    return wide;
  return block_width(k, outs);
}

// A zero-bordered NHWC image: pixel (y, x), channel c of sample n at
//   data[n * sample + y * row + x * pix + c]; (y, x) is source pixel (y - top, x - left).
struct Source {
  const float* data = nullptr;
  int64_t sample = 0, row = 0, pix = 0;
  std::unique_ptr<float[]> owned;
};

// Samples [n0, n0 + count) of `t` (any strides) as a Source of rows x cols pixels, shifted by
// (top, left) (negative: cropped). Channels_last with no border and no shift is read in place.
inline Source make_source(const Kernels& k, const at::Tensor& t, int64_t n0, int64_t count,
                          int64_t rows, int64_t cols, int64_t top, int64_t left) {
  const Strides s = strides_of(t);
  const int64_t c = t.size(t.dim() - 3), h = t.size(t.dim() - 2), w = t.size(t.dim() - 1);
  const float* x = t.const_data_ptr<float>();
  Source src;
  if (s.c == 1 && s.w == c && top == 0 && left == 0 && rows <= h && cols <= w) {
    src.data = x + n0 * s.n, src.sample = s.n, src.row = s.h, src.pix = s.w;
    return src;
  }
  src.pix = odd_lines(c, sizeof(float));
  src.row = cols * src.pix;
  src.sample = rows * src.row;
  src.owned.reset(new float[count * src.sample]);
  float* dst = src.owned.get();
  at::parallel_for(0, count * rows, cpu_grain(cols * c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = n0 + i / rows, y = i % rows - top;
      float* d = dst + i * src.row;
      const int64_t x0 = std::clamp<int64_t>(left, 0, cols);
      const int64_t x1 = std::clamp<int64_t>(w + left, x0, cols);
      if (y < 0 || y >= h || x0 >= x1) {
        std::fill(d, d + src.row, 0.0f);
        continue;
      }
      std::fill(d, d + x0 * src.pix, 0.0f);
      std::fill(d + x1 * src.pix, d + src.row, 0.0f);
      const float* sr = x + n * s.n + y * s.h;
      if (s.c == 1) {
        for (int64_t xx = x0; xx < x1; ++xx) {
          std::memcpy(d + xx * src.pix, sr + (xx - left) * s.w, sizeof(float) * c);
        }
#ifdef CNNEXT_X86_COPIES
      } else if (s.w == 1 && k.lanes == 16) {
        avx512::nchw_row_to_nhwc(sr + x0 - left, s.c, c, x1 - x0, d + x0 * src.pix, src.pix);
#endif
      } else {
        for (int64_t ch = 0; ch < c; ++ch) {
          const float* sc = sr + ch * s.c - left * s.w;
          for (int64_t xx = x0; xx < x1; ++xx) d[xx * src.pix + ch] = sc[xx * s.w];
        }
      }
    }
  });
  src.data = dst;
  return src;
}

// The filter as [groups][blocks][channel blocks][taps][channels][ocb], zero past `outs`: value(g,
// o, c, t) is the weight of output o and reduced channel c (both within group g) at packed tap t.
// A last block of at most ocb - lanes outputs runs the one-vector kernel: it is packed `lanes`
// wide (the kernel's filter stride is its own vector count), at the same block offset.
template <typename Value>
Packed pack_filter(int64_t groups, int64_t outs, int64_t chans, int64_t ntaps, int64_t ocb,
                   int64_t lanes, Value value) {
  const int64_t blocks = div_up(outs, ocb), block = ntaps * chans * ocb;
  Packed f(groups * blocks * block, 0.0f);
  at::parallel_for(0, groups * blocks, cpu_grain(block), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / blocks, o0 = i % blocks * ocb, nout = std::min(ocb, outs - o0);
      const int64_t width = div_up(nout, lanes) * lanes;
      float* d = f.data() + i * block;
      for (int64_t c = 0; c < chans; ++c) {
        // The kernel's order: channel blocks, then taps, then channels within the block.
        const int64_t c0 = c / kChanBlock * kChanBlock, nb = std::min(kChanBlock, chans - c0);
        for (int64_t t = 0; t < ntaps; ++t) {
          float* dd = d + (c0 * ntaps + t * nb + c - c0) * width;
          for (int64_t o = 0; o < nout; ++o) dd[o] = value(g, o0 + o, c, t);
        }
      }
    }
  });
  return f;
}

// Packed forward filters of the last few weights (eval calls the same weights over and over). An
// entry is reused only while it holds the same tensor (a weak reference, so a freed tensor's
// address cannot be taken for it), at the same data pointer and in-place version, in the same
// blocking. Inference tensors carry no version: never cached.
using FilterPtr = std::shared_ptr<const Packed>;

template <typename Pack>
FilterPtr cached_filter(const at::Tensor& weight, int64_t groups, int64_t ocb, Pack pack) {
  if (weight.is_inference()) return std::make_shared<const Packed>(pack());
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> tensor;
    const void* data;
    int64_t version, groups, ocb;
    std::vector<int64_t> sizes, strides;
    FilterPtr filter;
  };
  static std::mutex mutex;
  static std::vector<Entry> entries;  // most recent last
  // Enough for the convolutions of a ResNet-50 (~100 MB of filters).
  constexpr std::size_t kEntries = 64, kBytes = std::size_t(128) << 20;
  const c10::intrusive_ptr<c10::TensorImpl>& impl = weight.getIntrusivePtr();
  const int64_t version = weight._version();
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (auto it = entries.begin(); it != entries.end(); ++it) {
      if (it->data != weight.const_data_ptr() || it->version != version || it->ocb != ocb ||
          it->groups != groups || weight.sizes() != at::IntArrayRef(it->sizes) ||
          weight.strides() != at::IntArrayRef(it->strides))
        continue;
      const c10::intrusive_ptr<c10::TensorImpl> alive = it->tensor.lock();
      if (alive.get() != impl.get()) continue;
      Entry hit = std::move(*it);
      entries.erase(it);
      entries.push_back(std::move(hit));
      return entries.back().filter;
    }
  }
  FilterPtr filter = std::make_shared<const Packed>(pack());
  const std::lock_guard<std::mutex> lock(mutex);
  // Drop entries whose tensor is gone or is this one (a stale version: training repacks every
  // step and keeps one entry per weight), then the least recent beyond the limits.
  entries.erase(std::remove_if(entries.begin(), entries.end(),
                               [&](const Entry& e) {
                                 const c10::intrusive_ptr<c10::TensorImpl> t = e.tensor.lock();
                                 return !t || t.get() == impl.get();
                               }),
                entries.end());
  std::size_t bytes = filter->size() * sizeof(float);
  for (const Entry& e : entries) bytes += e.filter->size() * sizeof(float);
  std::size_t drop = 0;
  for (; drop < entries.size() && (entries.size() - drop >= kEntries || bytes > kBytes); ++drop)
    bytes -= entries[drop].filter->size() * sizeof(float);
  entries.erase(entries.begin(), entries.begin() + drop);
  if (bytes > kBytes) return filter;  // larger than the whole cache: not kept
  entries.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(impl), weight.const_data_ptr(),
                     version, groups, ocb, weight.sizes().vec(), weight.strides().vec(), filter});
  return filter;
}

// Output pixels of one run of a narrow plane in run_conv: its tile (x ocb) stays under ~512 KiB.
constexpr int64_t kRunPixels = 4096;

// The most samples per chunk for output planes ho x wo: narrow planes, one run of run_conv. At
// batch 96-128, 1 thread, chunks of two runs each (the filter blocks alternating between them)
// ran ResNet-18's 7x7 layer and the CIFAR 256-channel 8x8 layer 4-9% slower forward.
inline int64_t chunk_most(const Kernels& k, int64_t ho, int64_t wo) {
  return wo < k.row_block ? std::max<int64_t>(1, kRunPixels / std::max<int64_t>(1, ho * wo))
                          : INT64_MAX;
}

// The filter's taps as run_conv reads them from a Source: offsets from a window's origin in
// floats, and in pixels (dy, dx), with the source rows [y0, y1) and columns [x0, x1) that hold
// data (the rest is zero border).
struct Taps {
  std::vector<int64_t> offset, dy, dx;
  int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;

  int64_t size() const { return static_cast<int64_t>(offset.size()); }
  bool row_reaches(int64_t t, int64_t y) const { return y + dy[t] >= y0 && y + dy[t] < y1; }
  bool col_reaches(int64_t t, int64_t x) const { return x + dx[t] >= x0 && x + dx[t] < x1; }
};

// The layer's taps on a Source of its input made with borders (ph, pw): forward and grad_weight.
inline Taps input_taps(const Conv2dParams& p, const Source& src) {
  Taps taps{{}, {}, {}, p.ph, p.ph + p.h, p.pw, p.pw + p.w};
  for (int64_t t = 0; t < p.kh * p.kw; ++t) {
    taps.dy.push_back((t / p.kw) * p.dh);
    taps.dx.push_back((t % p.kw) * p.dw);
    taps.offset.push_back(taps.dy.back() * src.row + taps.dx.back() * src.pix);
  }
  return taps;
}

// Runs the conv kernel over `count` samples of `src`: ho x wo output pixels whose windows start
// at source pixel (oy * sh, ox * sw), reduced over `chans` channels per group (group g's start at
// channel g * chans) and `taps`, with the filter packed in blocks of ocb outputs (conv_width).
// `store(n, g, o0, nout, oy, tile)` writes one row: tile[ox * ocb + o] for the group's outputs
// o0 + o, o < nout.
template <typename Store>
void run_conv(const Kernels& k, const Source& src, int64_t count, int64_t groups, int64_t chans,
              int64_t outs, int64_t ho, int64_t wo, int64_t sh, int64_t sw, const Taps& taps,
              const Packed& filter, int64_t ocb, Store store) {
  const int64_t blocks = div_up(outs, ocb);
  const int64_t ntaps = taps.size(), block = ntaps * chans * ocb;
  // A tap whose reads all fall in the zero border is skipped, its products being zeros: pixels
  // run in classes by the taps that reach data. A 4x4 plane's 3x3 windows hold 100 nonzero
  // products of 144 (its corners take 4 taps), a 2x2 plane's 16 of 36, a 7x7 plane's 82%.
  struct Class {
    std::vector<int64_t> tap, offset;  // the taps run, and their offsets
    std::vector<int64_t> pix, opix;    // source and tile offsets of its pixels
  };
  const auto make_class = [&](std::vector<int64_t> tap) {
    Class c{std::move(tap), {}, {}, {}};
    for (const int64_t t : c.tap) c.offset.push_back(taps.offset[t]);
    return c;
  };
  // The kernel's arguments for class c's taps on filter block b of group g.
  const auto args_of = [&](const Class& c, int64_t g, int64_t b) {
    const int64_t n = static_cast<int64_t>(c.tap.size());
    return ConvArgs{c.offset.data(),
                    n,
                    chans,
                    sw * src.pix,
                    filter.data() + (g * blocks + b) * block,
                    ocb,
                    n < ntaps ? c.tap.data() : nullptr,
                    ntaps,
                    c.opix.empty() ? nullptr : c.opix.data()};
  };
  if (wo < k.row_block) {
    // Narrow planes (ResNet's 7x7, VGG's 4x4 and 2x2): the pixels of several samples run as one
    // sequence, so that register blocks are full (a 2x2 plane alone fills 4 of 12) and one filter
    // block, read from L2, serves them all. An item is (group, block, run of samples); the runs
    // split the batch only as far as the threads need (each pixel's sum is the same either way).
    const int64_t plane = ho * wo;
    const int64_t threads = at::get_num_threads();
    const int64_t by_size = chunk_most(k, ho, wo);
    const int64_t by_threads = div_up(count, div_up(2 * threads, groups * blocks));
    const int64_t run = std::clamp<int64_t>(std::min(by_size, by_threads), 1, count);
    const int64_t runs = div_up(count, run);
    // Plane pixels by their taps. A class too small to fill a register block over the chunk
    // joins the one with every tap (reading its zeros: blocks of one pixel ran a batch-1 4x4
    // layer ~1.4x slower). Decided by the shape alone, so that the products taken, and where
    // an infinite weight meets a zero border, do not depend on the thread count.
    std::map<std::vector<int64_t>, std::vector<int64_t>> by_taps;
    for (int64_t j = 0; j < plane; ++j) {
      std::vector<int64_t> tap;
      for (int64_t t = 0; t < ntaps; ++t) {
        if (taps.row_reaches(t, j / wo * sh) && taps.col_reaches(t, j % wo * sw)) tap.push_back(t);
      }
      by_taps[tap].push_back(j);
    }
    std::vector<int64_t> every(ntaps);
    for (int64_t t = 0; t < ntaps; ++t) every[t] = t;
    std::map<std::vector<int64_t>, std::vector<int64_t>> merged;
    for (const auto& [tap, js] : by_taps) {
      const bool small = count * static_cast<int64_t>(js.size()) < k.row_block;
      std::vector<int64_t>& dst = merged[small ? every : tap];
      dst.insert(dst.end(), js.begin(), js.end());
    }
    std::vector<Class> classes;
    for (const auto& [tap, js] : merged) {
      Class& c = classes.emplace_back(make_class(tap));
      // Sample-major: a shorter last run takes a prefix.
      for (int64_t n = 0; n < run; ++n) {
        for (const int64_t j : js) {
          c.pix.push_back(n * src.sample + j / wo * sh * src.row + j % wo * sw * src.pix);
          c.opix.push_back((n * plane + j) * ocb);
        }
      }
    }
    const int64_t items = groups * blocks * runs;
    at::parallel_for(
        0, items, cpu_grain(run * plane * ocb * chans * ntaps), [&](int64_t begin, int64_t end) {
          Packed tile(run * plane * ocb);
          for (int64_t item = begin; item < end; ++item) {
            const int64_t r = item % runs, b = item / runs % blocks, g = item / (runs * blocks);
            const int64_t n0 = r * run, nn = std::min(run, count - n0);
            const int64_t nout = std::min(ocb, outs - b * ocb);
            const float* x = src.data + n0 * src.sample + g * chans;
            for (const Class& c : classes) {
              const int64_t np = static_cast<int64_t>(c.pix.size()) / run * nn;
              k.conv_plane[div_up(nout, k.lanes)](args_of(c, g, b), x, c.pix.data(), np,
                                                  tile.data());
            }
            for (int64_t n = 0; n < nn; ++n) {
              for (int64_t oy = 0; oy < ho; ++oy)
                store(n0 + n, g, b * ocb, nout, oy, tile.data() + (n * plane + oy * wo) * ocb);
            }
          }
        });
    return;
  }
  // Rows by the rows of taps that reach data (the columns at a row's ends read the border).
  std::vector<Class> row_taps;
  for (int64_t oy = 0; oy < ho; ++oy) {
    std::vector<int64_t> tap;
    for (int64_t t = 0; t < ntaps; ++t) {
      if (taps.row_reaches(t, oy * sh)) tap.push_back(t);
    }
    row_taps.push_back(make_class(std::move(tap)));
  }
  const int64_t items = count * groups * blocks * ho;
  // Items run (sample, group, block, row), rows fastest: a task keeps one filter block in cache.
  at::parallel_for(0, items, cpu_grain(wo * ocb * chans * ntaps), [&](int64_t begin, int64_t end) {
    Packed tile(wo * ocb);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t oy = item % ho, b = item / ho % blocks, g = item / (ho * blocks) % groups;
      const int64_t n = item / (ho * blocks * groups);
      const int64_t nout = std::min(ocb, outs - b * ocb);
      const float* x = src.data + n * src.sample + oy * sh * src.row + g * chans;
      k.conv_row[div_up(nout, k.lanes)](args_of(row_taps[oy], g, b), x, wo, tile.data());
      store(n, g, b * ocb, nout, oy, tile.data());
    }
  });
}

// Writes a row tile[x * ocb + o] (x < wo, o < nout) to dst[o * cstride + x * xstride] as
// tile * scale[o] + bias[o] (null scale: 1, null bias: 0; both null: copied), then max(0, .) with
// `relu` (std::max keeps NaN, as torch.relu does). Writes run along the output's unit stride.
inline void store_row(const Kernels& k, const float* tile, int64_t ocb, int64_t wo, int64_t nout,
                      float* dst, int64_t cstride, int64_t xstride, const float* scale,
                      const float* bias, bool relu) {
#ifdef CNNEXT_X86_COPIES
  if (xstride == 1 && k.lanes == 16) {
    return avx512::store_row_nchw(tile, ocb, wo, nout, dst, cstride, scale, bias, relu);
  }
#endif
  float s[64], b[64];
  for (int64_t o = 0; o < nout; ++o) {
    s[o] = scale != nullptr ? scale[o] : 1.0f;
    b[o] = bias != nullptr ? bias[o] : 0.0f;
  }
  const bool copy = scale == nullptr && bias == nullptr && !relu;
  auto value = [&](int64_t x, int64_t o) {
    const float t = tile[x * ocb + o];
    if (copy) return t;
    const float v = t * s[o] + b[o];
    return relu ? std::max(v, 0.0f) : v;
  };
  if (xstride == 1) {
    for (int64_t o = 0; o < nout; ++o) {
      float* d = dst + o * cstride;
      for (int64_t x = 0; x < wo; ++x) d[x] = value(x, o);
    }
  } else {
    for (int64_t x = 0; x < wo; ++x) {
      float* d = dst + x * xstride;
      for (int64_t o = 0; o < nout; ++o) d[o * cstride] = value(x, o);
    }
  }
}

// Samples per packed chunk of a batch of n: packed copies stay near `bytes` (at least one
// sample), a chunk holds at most `most` samples, and the chunks are of equal size (a short last
// chunk ran a narrow plane with few pixels per filter block).
inline int64_t chunk_samples(int64_t n, int64_t sample_floats, int64_t bytes,
                             int64_t most = INT64_MAX) {
  if (n <= 1) return 1;
  const int64_t floats = bytes / static_cast<int64_t>(sizeof(float));
  const int64_t step =
      std::clamp<int64_t>(std::min(most, floats / std::max<int64_t>(1, sample_floats)), 1, n);
  return div_up(n, div_up(n, step));
}

// The bound on a chunk for output rows `wo` wide. Wide rows run sample by sample (run_conv's
// items, grad_weight's calls), so a chunk of ~1 MiB is packed and then used while it is still in
// L2. 32 MiB chunks went out to memory between the two passes (and past glibc's mmap threshold:
// fresh pages every call): at batch 32, 1 thread, ResNet-18's 56x56 layer and stride-2 layers ran
// 5-15% slower forward and 15-30% slower in grad_weight. Narrow planes run many samples per filter
// block (run_conv) or per register block (grad_weight), which wants them all in one chunk.
inline int64_t chunk_bytes(const Kernels& k, int64_t wo) {
  return wo >= k.row_block ? int64_t(1) << 20 : int64_t(32) << 20;
}

// Forward with the fused epilogue of cpu.cpp: acc * scale[c] + bias[c] (null scale: 1, null
// bias: 0), then max(0, .) with `relu` (std::max keeps NaN, as torch.relu does).
inline void forward(const Conv2dParams& p, CpuIsa isa, const at::Tensor& input,
                    const at::Tensor& weight, const float* bias, const float* scale, bool relu,
                    at::Tensor& output) {
  const Kernels& k = *kernels_for(isa);
  const int64_t cin = p.c_in_per_group(), cout = p.c_out_per_group(), ntaps = p.kh * p.kw;
  const int64_t rows = (p.h_out - 1) * p.sh + (p.kh - 1) * p.dh + 1;
  const int64_t cols = (p.w_out - 1) * p.sw + (p.kw - 1) * p.dw + 1;
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1), ws2 = weight.stride(2),
                ws3 = weight.stride(3);
  const float* w = weight.const_data_ptr<float>();
  const int64_t ocb = conv_width(k, cout, cin, ntaps);
  const FilterPtr filter = cached_filter(weight, p.groups, ocb, [&] {
    return pack_filter(
        p.groups, cout, cin, ntaps, ocb, k.lanes, [&](int64_t g, int64_t o, int64_t c, int64_t t) {
          return w[(g * cout + o) * ws0 + c * ws1 + (t / p.kw) * ws2 + (t % p.kw) * ws3];
        });
  });
  const Strides os = strides_of(output);
  float* out = output.mutable_data_ptr<float>();
  const int64_t step = chunk_samples(p.n, rows * cols * odd_lines(p.c_in, sizeof(float)),
                                     chunk_bytes(k, p.w_out), chunk_most(k, p.h_out, p.w_out));
  for (int64_t n0 = 0; n0 < p.n; n0 += step) {
    const int64_t count = std::min(step, p.n - n0);
    const Source src = make_source(k, input, n0, count, rows, cols, p.ph, p.pw);
    run_conv(k, src, count, p.groups, cin, cout, p.h_out, p.w_out, p.sh, p.sw, input_taps(p, src),
             *filter, ocb,
             [&](int64_t n, int64_t g, int64_t o0, int64_t nout, int64_t oy, const float* tile) {
               float* dst = out + (n0 + n) * os.n + (g * cout + o0) * os.c + oy * os.h;
               store_row(k, tile, ocb, p.w_out, nout, dst, os.c, os.w,
                         scale != nullptr ? scale + g * cout + o0 : nullptr,
                         bias != nullptr ? bias + g * cout + o0 : nullptr, relu);
             });
  }
}

// grad_input, split by stride phase: the inputs (iy, ix) with (iy + ph) % sh == rh and
// (ix + pw) % sw == rw receive only the taps with ky * dh % sh == rh and kx * dw % sw == rw, so
// per phase it is a stride-1 correlation of grad_output (bordered by the filter's reach) with
// that subset of the filter, flipped in space and transposed in channels: no product with a
// structural zero between strided outputs. At stride 1 there is one phase with every tap.
inline void grad_input(const Conv2dParams& p, CpuIsa isa, const at::Tensor& grad_output,
                       const at::Tensor& weight, at::Tensor& grad_input) {
  const Kernels& k = *kernels_for(isa);
  const int64_t cin = p.c_in_per_group(), cout = p.c_out_per_group();
  const int64_t bh = (p.kh - 1) * p.dh / p.sh, bw = (p.kw - 1) * p.dw / p.sw;
  struct Phase {
    int64_t rh, rw, a0, rows, c0, cols;  // iy = (a0 + a) * sh + rh - ph, a < rows; ix alike
    std::vector<int64_t> ky, kx;         // its taps
    Packed filter;
  };
  std::vector<Phase> phases;
  int64_t rows = 0, cols = 0;  // of the bordered grad_output
  for (int64_t rh = 0; rh < p.sh; ++rh) {
    for (int64_t rw = 0; rw < p.sw; ++rw) {
      Phase f{rh, rw, div_up(p.ph - rh, p.sh), 0, div_up(p.pw - rw, p.sw), 0, {}, {}, {}};
      // First a with iy >= 0 (p.ph - rh may be negative: then a0 = 0 via the clamp below).
      f.a0 = std::max<int64_t>(0, f.a0), f.c0 = std::max<int64_t>(0, f.c0);
      const int64_t last_y = p.h - 1 + p.ph - rh, last_x = p.w - 1 + p.pw - rw;
      f.rows = last_y >= 0 ? last_y / p.sh - f.a0 + 1 : 0;
      f.cols = last_x >= 0 ? last_x / p.sw - f.c0 + 1 : 0;
      if (f.rows <= 0 || f.cols <= 0) continue;
      for (int64_t ky = 0; ky < p.kh; ++ky) {
        for (int64_t kx = 0; kx < p.kw; ++kx) {
          if (ky * p.dh % p.sh != rh || kx * p.dw % p.sw != rw) continue;
          f.ky.push_back(ky);
          f.kx.push_back(kx);
        }
      }
      rows = std::max(rows, f.a0 + f.rows + bh);
      cols = std::max(cols, f.c0 + f.cols + bw);
      phases.push_back(std::move(f));
    }
  }
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1), ws2 = weight.stride(2),
                ws3 = weight.stride(3);
  const float* w = weight.const_data_ptr<float>();
  // One block width for every phase: the layer's, not each phase's share of the taps.
  const int64_t icb = conv_width(k, cin, cout, p.kh * p.kw);
  for (Phase& f : phases) {
    f.filter =
        pack_filter(p.groups, cin, cout, static_cast<int64_t>(f.ky.size()), icb, k.lanes,
                    [&](int64_t g, int64_t i, int64_t o, int64_t t) {
                      return w[(g * cout + o) * ws0 + i * ws1 + f.ky[t] * ws2 + f.kx[t] * ws3];
                    });
  }
  const Strides is = strides_of(grad_input);
  float* gi = grad_input.mutable_data_ptr<float>();
  int64_t narrowest = cols, most = INT64_MAX;
  for (const Phase& f : phases) {
    narrowest = std::min(narrowest, f.cols);
    most = std::min(most, chunk_most(k, f.rows, f.cols));
  }
  const int64_t step = chunk_samples(p.n, rows * cols * odd_lines(p.c_out, sizeof(float)),
                                     chunk_bytes(k, narrowest), most);
  for (int64_t n0 = 0; n0 < p.n; n0 += step) {
    const int64_t count = std::min(step, p.n - n0);
    // Source pixel (ys, xs) is grad_output (ys - bh, xs - bw), zero outside it.
    const Source src = make_source(k, grad_output, n0, count, rows, cols, bh, bw);
    for (const Phase& f : phases) {
      // Output (a, c) reads grad_output (a0 + a - ky * dh / sh, c0 + c - kx * dw / sw).
      Taps taps{{}, {}, {}, bh, bh + p.h_out, bw, bw + p.w_out};
      for (std::size_t t = 0; t < f.ky.size(); ++t) {
        taps.dy.push_back(f.a0 - f.ky[t] * p.dh / p.sh + bh);
        taps.dx.push_back(f.c0 - f.kx[t] * p.dw / p.sw + bw);
        taps.offset.push_back(taps.dy.back() * src.row + taps.dx.back() * src.pix);
      }
      run_conv(k, src, count, p.groups, cout, cin, f.rows, f.cols, 1, 1, taps, f.filter, icb,
               [&](int64_t n, int64_t g, int64_t i0, int64_t nin, int64_t a, const float* tile) {
                 float* dst = gi + (n0 + n) * is.n + (g * cin + i0) * is.c +
                              ((f.a0 + a) * p.sh + f.rh - p.ph) * is.h +
                              (f.c0 * p.sw + f.rw - p.pw) * is.w;
                 store_row(k, tile, icb, f.cols, nin, dst, is.c, p.sw * is.w, nullptr, nullptr,
                           false);
               });
    }
  }
}

// What one grad_weight kernel call reads: a contiguous run of the input (every channel of its
// rows) and grad_output pixels, `lanes` floats each at a stride of `gstep`. fetch(j, calls, ...)
// prefetches part j of `calls` of it into L2.
struct Window {
  const float* x = nullptr;
  int64_t x_floats = 0;
  const float* g = nullptr;
  int64_t g_pixels = 0;

  void fetch(int64_t j, int64_t calls, int64_t gstep, int64_t lanes) const {
#if defined(__GNUC__)
    constexpr int64_t kLine = 64 / sizeof(float);
    const int64_t lines = div_up(x_floats, kLine);
    for (int64_t l = j * lines / calls; l < (j + 1) * lines / calls; ++l)
      __builtin_prefetch(x + l * kLine, 0, 2);
    for (int64_t q = j * g_pixels / calls; q < (j + 1) * g_pixels / calls; ++q) {
      for (int64_t v = 0; v < lanes; v += kLine) __builtin_prefetch(g + q * gstep + v, 0, 2);
    }
#else
    (void)j, (void)calls, (void)gstep, (void)lanes;
#endif
  }
};

// grad_weight[o][c][t] = sum over samples and output pixels of grad_output x input at the tap.
// A task owns (group, output block, run of input channels) for the whole batch: per group of
// samples it sums in float registers and memory, then adds the group's sum into a double total,
// in sample order.
inline void grad_weight(const Conv2dParams& p, CpuIsa isa, const at::Tensor& grad_output,
                        const at::Tensor& input, at::Tensor& grad_weight) {
  const Kernels& k = *kernels_for(isa);
  const int64_t cin = p.c_in_per_group(), cout = p.c_out_per_group(), ntaps = p.kh * p.kw;
  const int64_t ocb = block_width(k, cout), blocks = div_up(cout, ocb);
  const int64_t rows = (p.h_out - 1) * p.sh + (p.kh - 1) * p.dh + 1;
  const int64_t cols = (p.w_out - 1) * p.sw + (p.kw - 1) * p.dw + 1;
  // Packed grad_output pixels: every group's blocks, zero-padded, at a stride of an odd number of
  // lines (a power-of-two stride kept the slice in a quarter of the L1 sets).
  const int64_t cgo = odd_lines(p.groups * blocks * ocb, sizeof(float));
  const int64_t hw = p.h_out * p.w_out;
  // Channel runs per (group, block) so that every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t runs =
      std::clamp<int64_t>(div_up(2 * threads, p.groups * blocks), 1, div_up(cin, 16));
  const int64_t run_chans = div_up(cin, runs);
  const int64_t items = p.groups * blocks * runs;
  // Rows per kernel call: a call's grad_output slice (nrows * wo * ocb floats) stays in L1.
  const int64_t nrows = std::clamp<int64_t>(4096 / std::max<int64_t>(1, p.w_out * ocb), 1, p.h_out);
  std::vector<double> total(items * ntaps * run_chans * ocb, 0.0);
  // Samples summed in float before a double add: ~256 pixels' worth (small planes would
  // otherwise spend more on the adds than on the products). Fixed by the shape alone.
  const int64_t flush = std::max<int64_t>(1, 256 / std::max<int64_t>(1, hw));

  const Strides gs = strides_of(grad_output);
  const float* go = grad_output.const_data_ptr<float>();
  const int64_t step = chunk_samples(p.n, rows * cols * odd_lines(p.c_in, sizeof(float)) + hw * cgo,
                                     chunk_bytes(k, p.w_out));
  // On cache lines: the kernel's vector loads of it would otherwise each span two lines.
  Packed gop(step * hw * cgo);
  for (int64_t n0 = 0; n0 < p.n; n0 += step) {
    const int64_t count = std::min(step, p.n - n0);
    const Source src = make_source(k, input, n0, count, rows, cols, p.ph, p.pw);
    // grad_output as [n][oy][ox][group][block][ocb], zero past each group's channels.
    at::parallel_for(0, count * p.h_out, cpu_grain(p.w_out * cgo), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / p.h_out, oy = i % p.h_out;
        float* d = gop.data() + i * p.w_out * cgo;
        std::fill(d, d + p.w_out * cgo, 0.0f);
        const float* s = go + (n0 + n) * gs.n + oy * gs.h;
#ifdef CNNEXT_X86_COPIES
        if (gs.w == 1 && k.lanes == 16) {
          // NCHW rows through register transposes (the scalar copy took ~10% of a 64-channel
          // grad_weight); channels past cout up to a multiple of 16 are written as zeros, inside
          // the group's blocks * ocb.
          for (int64_t g = 0; g < p.groups; ++g) {
            avx512::nchw_row_to_nhwc(s + g * cout * gs.c, gs.c, cout, p.w_out, d + g * blocks * ocb,
                                     cgo);
          }
          continue;
        }
#endif
        for (int64_t g = 0; g < p.groups; ++g) {
          for (int64_t o = 0; o < cout; ++o) {
            const float* so = s + (g * cout + o) * gs.c;
            float* dd = d + g * blocks * ocb + o;
            for (int64_t ox = 0; ox < p.w_out; ++ox) dd[ox * cgo] = so[ox * gs.w];
          }
        }
      }
    });
    const Taps taps = input_taps(p, src);
    const int64_t item_work = count * hw * ntaps * run_chans * ocb;
    // Per tap, the rows of each call's block and the columns whose input pixel holds data: the
    // rest would only multiply the zero border (a 4x4 plane's 3x3 windows: 100 of 144 products).
    const auto span = [](int64_t n, auto reaches) {
      std::pair<int64_t, int64_t> s{0, 0};
      while (s.first < n && !reaches(s.first)) ++s.first;
      s.second = s.first;
      while (s.second < n && reaches(s.second)) ++s.second;
      return s;
    };
    std::vector<std::pair<int64_t, int64_t>> row_span, col_span;
    for (int64_t t = 0; t < ntaps; ++t)
      col_span.push_back(span(p.w_out, [&](int64_t q) { return taps.col_reaches(t, q * p.sw); }));
    for (int64_t oy = 0; oy < p.h_out; oy += nrows) {
      for (int64_t t = 0; t < ntaps; ++t) {
        row_span.push_back(span(std::min(nrows, p.h_out - oy),
                                [&](int64_t r) { return taps.row_reaches(t, (oy + r) * p.sh); }));
      }
    }
    // Samples [n, n + m) from output row oy on, as one kernel call reads them.
    auto window = [&](int64_t n, int64_t oy, int64_t m, int64_t g, int64_t b) {
      const int64_t nr = std::min(nrows, p.h_out - oy);
      Window w;
      w.x = src.data + n * src.sample + oy * p.sh * src.row;
      w.x_floats = (m - 1) * src.sample + ((nr - 1) * p.sh + (p.kh - 1) * p.dh + 1) * src.row;
      w.g = gop.data() + (n * p.h_out + oy) * p.w_out * cgo + (g * blocks + b) * ocb;
      w.g_pixels = m * nr * p.w_out;
      return w;
    };
    at::parallel_for(0, items, cpu_grain(item_work), [&](int64_t begin, int64_t end) {
      Packed part(ntaps * run_chans * ocb);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item % runs, b = item / runs % blocks, g = item / (runs * blocks);
        const int64_t c0 = r * run_chans, nc = std::min(run_chans, cin - c0);
        if (nc <= 0) continue;
        const int64_t nv = div_up(std::min(ocb, cout - b * ocb), k.lanes);
        double* tot = total.data() + item * ntaps * run_chans * ocb;
        auto window_of = [&](int64_t n, int64_t oy, int64_t m) { return window(n, oy, m, g, b); };
        for (int64_t n = 0; n < count;) {
          if ((n0 + n) % flush == 0 || n == 0) std::fill(part.begin(), part.end(), 0.0f);
          // Whole planes: the rest of this flush group's samples in one call (the same sums in
          // the same order as one call per sample).
          const int64_t group_end = std::min(count, n + flush - (n0 + n) % flush);
          const int64_t m = nrows == p.h_out ? group_end - n : 1;
          for (int64_t oy = 0; oy < p.h_out; oy += nrows) {
            // The next call's input window and grad_output slice, fetched into L2 a piece per
            // kernel call of this one: on first touch from memory they held the kernel at ~70%
            // of its in-cache speed.
            Window next;
            if (oy + nrows < p.h_out) {
              next = window_of(n, oy + nrows, m);
            } else if (n + m < count) {
              const int64_t n1 = n + m;
              next = window_of(
                  n1, 0,
                  nrows == p.h_out ? std::min(count, n1 + flush - (n0 + n1) % flush) - n1 : 1);
            }
            const GwArgs a{std::min(nrows, p.h_out - oy),
                           p.w_out,
                           p.sh * src.row,
                           p.sw * src.pix,
                           cgo,
                           ocb,
                           m,
                           src.sample,
                           hw * cgo};
            const float* gr =
                gop.data() + ((n * p.h_out + oy) * p.w_out) * cgo + (g * blocks + b) * ocb;
            const float* xr = src.data + n * src.sample + oy * p.sh * src.row + g * cin + c0;
            // One register block of channels over every tap before the next (as fast as
            // tap-major order, and it keeps the block's window in L1 over the taps): many short
            // calls, each prefetching a small piece of the next window. Blocks as gw_run's.
            const int64_t cblocks = div_up(nc, k.gw_chans[nv]);
            const int64_t calls = cblocks * ntaps;
            for (int64_t i = 0, c = 0, j = 0; i < cblocks; ++i) {
              const int64_t cb = nc / cblocks + (i < nc % cblocks ? 1 : 0);
              for (int64_t t = 0; t < ntaps; ++t, ++j) {
                next.fetch(j, calls, cgo, nv * k.lanes);
                const auto [r0, r1] = row_span[oy / nrows * ntaps + t];
                const auto [q0, q1] = col_span[t];
                if (r0 >= r1 || q0 >= q1) continue;
                GwArgs at = a;
                at.nrows = r1 - r0, at.wo = q1 - q0, at.grow = p.w_out * cgo;
                k.gw_run[nv](at, cb, xr + taps.offset[t] + c + r0 * a.xrow + q0 * a.xstep,
                             gr + (r0 * p.w_out + q0) * cgo,
                             part.data() + (t * run_chans + c) * ocb);
              }
              c += cb;
            }
          }
          n += m;
          if ((n0 + n) % flush == 0 || n == count) {
            for (std::size_t j = 0; j < part.size(); ++j) tot[j] += part[j];
          }
        }
      }
    });
  }
  // Unpack into the weight's shape, contiguous: [C_out][C_in / groups][kh][kw], one item's
  // L2-sized block at a time, writing each output channel's run of (channel, tap) in order.
  float* gw = grad_weight.mutable_data_ptr<float>();
  const int64_t item_size = ntaps * run_chans * ocb;
  at::parallel_for(0, items, cpu_grain(item_size), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item % runs, b = item / runs % blocks, g = item / (runs * blocks);
      const int64_t c0 = r * run_chans, nc = std::min(run_chans, cin - c0);
      const int64_t nout = std::min(ocb, cout - b * ocb);
      const double* tot = total.data() + item * item_size;
      for (int64_t o = 0; o < nout; ++o) {
        float* dst = gw + ((g * cout + b * ocb + o) * cin + c0) * ntaps;
        for (int64_t ci = 0; ci < nc; ++ci) {
          for (int64_t t = 0; t < ntaps; ++t)
            dst[ci * ntaps + t] = static_cast<float>(tot[(t * run_chans + ci) * ocb + o]);
        }
      }
    }
  });
}

}  // namespace cnnext::nhwc
