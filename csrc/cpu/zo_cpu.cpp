// CPU kernels of zokern's ops (zokern::native_*, CPU dispatch key): a whole list of tensors per call,
// OpenMP-parallel over a table of chunks that covers all of them. The element math is csrc/include/zokern/{philox,element}.h, shared
// with CUDA; the kernels that draw random numbers do it in SIMD blocks (zo_cpu_kernels.inc).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "zo_simd.h"
#include "zokern/backend_ops.h"
#include "zokern/element.h"

#if defined(ZK_X86) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// ---- the kernels that draw, one copy per ISA level; the widest the CPU has runs (all give the same bits) ----

namespace zokern {
namespace simd {
#define ZK_LEVEL 0
#define ZK_TARGET
namespace generic {
#include "zo_cpu_kernels.inc"
}
#undef ZK_TARGET
#undef ZK_LEVEL
#ifdef ZK_X86
#define ZK_LEVEL 1
#define ZK_TARGET ZK_TARGET_AVX2
namespace avx2 {
#include "zo_cpu_kernels.inc"
}
#undef ZK_TARGET
#undef ZK_LEVEL
#define ZK_LEVEL 2
#define ZK_TARGET ZK_TARGET_AVX512
namespace avx512 {
#include "zo_cpu_kernels.inc"
}
#undef ZK_TARGET
#undef ZK_LEVEL
#endif
}  // namespace simd
}  // namespace zokern

namespace {

using namespace zokern;

constexpr int64_t kDefaultChunk = int64_t(1) << 16;

enum class Level { kGeneric, kAvx2, kAvx512 };

// ZOKERN_CPU_SIMD=generic|avx2|avx512|avx512bf16 caps the level (to test the narrower paths on a wider CPU); set at
// all, it also keeps AMX off, and all but avx512bf16 the AVX512-BF16 dot products (bf16_lowrank_path).
Level detect_level() {
  Level level = Level::kGeneric;
#ifdef ZK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    level = Level::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      level = Level::kAvx512;
    }
  }
#endif
  const char* cap = std::getenv("ZOKERN_CPU_SIMD");
  if (cap != nullptr && std::strcmp(cap, "generic") == 0) level = Level::kGeneric;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) level = std::min(level, Level::kAvx2);
  return level;
}

Level simd_level() {
  static const Level level = detect_level();
  return level;
}

// Calls simd::<level>::kernel(args...) for the CPU's level.
#ifdef ZK_X86
#define ZK_RUN(kernel, ...)                                                 \
  switch (simd_level()) {                                                   \
    case Level::kAvx512: simd::avx512::kernel(__VA_ARGS__); break;          \
    case Level::kAvx2: simd::avx2::kernel(__VA_ARGS__); break;              \
    default: simd::generic::kernel(__VA_ARGS__);                            \
  }
#else
#define ZK_RUN(kernel, ...) simd::generic::kernel(__VA_ARGS__)
#endif

// Calls f with a value of the storage type of `dtype` (float32, bfloat16 or float16; checked by the caller).
template <class F>
inline void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(bf16{}); break;
    default: f(f16{}); break;
  }
}

void check_params(at::TensorList params, const char* what = "params") {
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "zokern_cpp: ", what, " must be contiguous CPU tensors");
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "zokern_cpp: ", what, " must be float32, bfloat16 or float16");
  }
}

// Companions (Hessians, anchors, sources, masks) go with params one to one, `numel(p)` elements each.
void check_companions(at::TensorList params, at::TensorList others, const char* what, bool words = false) {
  TORCH_CHECK(others.size() == params.size(), "zokern_cpp: one ", what, " per tensor");
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& o = others[t];
    TORCH_CHECK(o.device().is_cpu() && o.is_contiguous(), "zokern_cpp: ", what, " must be contiguous CPU tensors");
    if (words) {
      TORCH_CHECK(o.scalar_type() == at::kInt && o.numel() == (params[t].numel() + 31) / 32,
                  "zokern_cpp: masks must be int32 with one word per 32 elements");
    } else {
      TORCH_CHECK(o.numel() == params[t].numel(), "zokern_cpp: ", what, " must match their tensors' sizes");
    }
  }
  if (!words) check_params(others, what);
}

const float* per_tensor(const at::Tensor& values, size_t count, const char* what) {
  TORCH_CHECK(values.device().is_cpu() && values.is_contiguous() && values.scalar_type() == at::kFloat &&
                  values.numel() == static_cast<int64_t>(count),
              "zokern_cpp: ", what, " must be a contiguous float32 CPU tensor with one entry per tensor");
  return values.data_ptr<float>();
}

// Runs f(t, begin, end) over chunks of `chunk` elements (default kDefaultChunk, rounded up to a multiple
// of `align`) of every non-empty tensor t, in parallel.
template <class F>
void for_chunks(at::TensorList params, int64_t chunk, int64_t align, const F& f) {
  chunk = chunk > 0 ? chunk : kDefaultChunk;
  chunk = (chunk + align - 1) / align * align;
  struct Chunk {
    int64_t t, begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += chunk) chunks.push_back({static_cast<int64_t>(t), b, std::min(n, b + chunk)});
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
// One chunk runs on the calling thread: waking the team costs more than a small tensor's work.
#pragma omp parallel for schedule(dynamic, 1) if (num_chunks > 1)
  for (int64_t c = 0; c < num_chunks; ++c) f(chunks[c].t, chunks[c].begin, chunks[c].end);
}

// ---- the element-wise ops' loops (backend_ops.h turns the schemas' scalars into their Ops) ----

struct Loops {
  template <class Op>
  static void mezo_all(at::TensorList params, at::IntArrayRef streams, const std::vector<int64_t>& offsets,
                        const std::vector<float>& wds, int64_t chunk, const Op& op) {
    TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size(), "zokern_cpp: list lengths differ");
    check_params(params);
    for_chunks(params, chunk, 1, [&](int64_t t, int64_t begin, int64_t end) {
      dispatch(params[t].scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        ZK_RUN(mezo_range, static_cast<T*>(params[t].data_ptr()), begin, end, offsets[t],
               static_cast<uint32_t>(streams[t]), wds[t], op);
      });
    });
  }

  // Sparse MeZO: chunks of whole mask words.
  template <class Op>
  static void sparse_all(at::TensorList params, at::TensorList masks, const at::Tensor& thresholds,
                         at::IntArrayRef streams, const std::vector<int64_t>& offsets, const std::vector<float>& wds,
                         int64_t chunk, const Op& op) {
    TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size(), "zokern_cpp: list lengths differ");
    check_params(params);
    check_companions(params, masks, "masks", /*words=*/true);
    const float* h = per_tensor(thresholds, params.size(), "thresholds");
    for_chunks(params, chunk, 32, [&](int64_t t, int64_t begin, int64_t end) {
      dispatch(params[t].scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        ZK_RUN(sparse_range, static_cast<T*>(params[t].data_ptr()), static_cast<uint32_t*>(masks[t].data_ptr()),
               begin, end, offsets[t], static_cast<uint32_t>(streams[t]), wds[t], h[t], op);
      });
    });
  }

  // HiZOO: D in float32 or in the parameter's dtype.
  template <class Op>
  static void hizoo_all(at::TensorList params, at::TensorList hessians, at::IntArrayRef streams,
                          const std::vector<int64_t>& offsets, const std::vector<float>& wds, int64_t chunk,
                          const Op& op) {
    TORCH_CHECK(params.size() == streams.size() && params.size() == wds.size(), "zokern_cpp: list lengths differ");
    check_params(params);
    check_companions(params, hessians, "hessians");
    for_chunks(params, chunk, 1, [&](int64_t t, int64_t begin, int64_t end) {
      dispatch(params[t].scalar_type(), [&](auto tag) {
        dispatch(hessians[t].scalar_type(), [&](auto dtag) {
          using T = decltype(tag);
          using TD = decltype(dtag);
          ZK_RUN(hizoo_range, static_cast<T*>(params[t].data_ptr()), static_cast<TD*>(hessians[t].data_ptr()),
                 begin, end, offsets[t], static_cast<uint32_t>(streams[t]), wds[t], op);
        });
      });
    });
  }
};

// ---- low-rank (SubZero) ----

constexpr int64_t kPrepareRows = simd::kPanelCols;  // rows of U·C, and of V (one panel of Vᵀ), per work item
constexpr int64_t kRowBlock = 48;  // rows of W per work item: whole register tiles (6 or 2 rows) in all but the last
constexpr int64_t kColBlock = simd::generic::kBlock;  // columns of W per work item: Vᵀ's r×256 floats stay in L2

int64_t num_panels(int64_t cols) { return (cols + simd::kPanelCols - 1) / simd::kPanelCols; }

// The r×r core C in panels of kPanelCols columns, row b of panel p at panels + (p·r + b)·kPanelCols, zero past
// column r: the layout zo_cpu_kernels.inc's tiles read (Vᵀ's panels: subzero_pack_vt).
void pack_core(const float* core, int64_t r, float* panels) {
  for (int64_t p = 0; p < num_panels(r); ++p) {
    const int64_t j0 = p * simd::kPanelCols, width = std::min(simd::kPanelCols, r - j0);
    for (int64_t b = 0; b < r; ++b) {
      float* row = panels + (p * r + b) * simd::kPanelCols;
      memcpy(row, core + b * r + j0, width * sizeof(float));
      std::fill(row + width, row + simd::kPanelCols, 0.f);
    }
  }
}

// How a bfloat16 W's low-rank sums are computed, all in element.h's order: register tiles (every level), AVX512-BF16
// dot products, or AMX tiles.
enum class LowrankPath { kRegisterTiles, kDot, kAmx };

// The rank padded to whole blocks of kLowrankBlock: the row stride of the bfloat16 U·C (AMX, dot words) and the rank
// its Vᵀ holds.
int64_t padded_rank(int64_t r) { return (r + kLowrankBlock - 1) / kLowrankBlock * kLowrankBlock; }

// out[0 .. n) = element.h's lowrank_operand(x[0 .. n)) as bfloat16 bits (uint16_t) or float32 values (float).
template <class T, class Out>
void operands(const T* x, int64_t n, Out* out) {
  ZK_RUN(subzero_operands, x, n, out);
}

// One row of r operands (bfloat16 bits) as dot words (zo_simd.h): word 2s + h is bits[4s + h] in its high half and
// bits[4s + h + 2] in its low half (zeros past r), written at out[(2s + h)·stride].
void dot_words(const uint16_t* bits, int64_t r, uint32_t* out, int64_t stride) {
  const auto four = [&](int64_t a, const uint16_t* b) {
    out[a / 2 * stride] = uint32_t{b[0]} << 16 | b[2];
    out[(a / 2 + 1) * stride] = uint32_t{b[1]} << 16 | b[3];
  };
  int64_t a = 0;
  for (; a + 4 <= r; a += 4) four(a, bits + a);
  if (a < r) {
    uint16_t last[4] = {0, 0, 0, 0};
    for (int64_t k = a; k < r; ++k) last[k - a] = bits[k];
    four(a, last);
  }
}

// W += (U·C)·Vᵀ without an m×n temporary, as a small GEMM: the core C and Vᵀ packed in panels (float32), then
// float32 U·C (m×r), then tiles of W, each element summing over the rank in register tiles
// (zo_cpu_kernels.inc's subzero_uc_rows and subzero_rows, vectorised over columns for the CPU's SIMD level).
// A bfloat16 W takes lowrank_operand values of U·C and V in element.h's order for it, by `path`: AMX tiles (U·C and
// Vᵀ as bfloat16 blocks, zo_cpu_kernels.inc's subzero_rows_amx), dot products (U·C and Vᵀ as dot words, zo_simd.h),
// or register tiles (float32). Sums as element.h says; stored with `rounding`, keyed by (seed, streams[t],
// offsets[t] + row-major index).
void lowrank_apply_with(at::TensorList weights, at::TensorList us, at::TensorList vs, at::TensorList cores,
                        at::IntArrayRef streams, int64_t seed, at::IntArrayRef offsets, int64_t rounding,
                        LowrankPath path) {
  const size_t count = weights.size();
  TORCH_CHECK(us.size() == count && vs.size() == count && cores.size() == count, "zokern_cpp: list lengths differ");
  const std::vector<int64_t> ids = per_tensor_or_zeros(streams, count, "stream id");
  const std::vector<int64_t> first = element_offsets(offsets, count);
  check_params(weights, "weights");
  check_params(us, "us");
  check_params(vs, "vs");
  TORCH_CHECK(path == LowrankPath::kRegisterTiles || simd_level() == Level::kAvx512,
              "zokern_cpp: AMX and dot products need the AVX-512 level");
  std::vector<at::Tensor> uc(count), vt(count), core_panels(count), ucb(count), vt_blocks(count);
  std::vector<LowrankPath> paths(count, LowrankPath::kRegisterTiles);
  struct Item {
    int64_t t, row, col;  // col < 0: a block of rows of U·C and of V (phase 1); else a tile of W (phase 2)
  };
  std::vector<Item> prepare, tiles;
  for (size_t t = 0; t < count; ++t) {
    const at::Tensor &w = weights[t], &u = us[t], &v = vs[t], &c = cores[t];
    TORCH_CHECK(w.dim() == 2 && u.dim() == 2 && v.dim() == 2 && u.size(0) == w.size(0) && v.size(0) == w.size(1) &&
                    u.size(1) == v.size(1),
                "zokern_cpp: W (m×n) needs U (m×r) and V (n×r)");
    TORCH_CHECK(c.device().is_cpu() && c.is_contiguous() && c.scalar_type() == at::kFloat && c.dim() == 2 &&
                    c.size(0) == u.size(1) && c.size(1) == u.size(1),
                "zokern_cpp: cores must be contiguous float32 r×r CPU tensors");
    const int64_t m = w.size(0), n = w.size(1), r = u.size(1);
    if (m * n == 0) continue;
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    uc[t] = at::empty({m * r}, f32);
    if (w.scalar_type() == at::kBFloat16 && r > 0) paths[t] = path;
    if (paths[t] != LowrankPath::kRegisterTiles) {
      const auto u16 = at::TensorOptions().dtype(at::kShort);
      const int64_t r_pad = padded_rank(r);
      ucb[t] = at::zeros({(m + simd::kAmxRows - 1) / simd::kAmxRows * simd::kAmxRows * r_pad}, u16);
      vt_blocks[t] = at::zeros({num_panels(n) * r_pad * simd::kPanelCols}, u16);
    } else {
      vt[t] = at::empty({num_panels(n) * r * simd::kPanelCols}, f32);
    }
    core_panels[t] = at::empty({num_panels(r) * r * simd::kPanelCols}, f32);
    pack_core(c.data_ptr<float>(), r, core_panels[t].data_ptr<float>());
    for (int64_t i = 0; i < std::max(m, n); i += kPrepareRows) prepare.push_back({static_cast<int64_t>(t), i, -1});
    for (int64_t i = 0; i < m; i += kRowBlock) {
      for (int64_t j = 0; j < n; j += kColBlock) tiles.push_back({static_cast<int64_t>(t), i, j});
    }
  }

  const int64_t num_prepare = static_cast<int64_t>(prepare.size());
#pragma omp parallel for schedule(dynamic, 1) if (num_prepare > 1)
  for (int64_t k = 0; k < num_prepare; ++k) {
    const int64_t t = prepare[k].t, i0 = prepare[k].row;
    const int64_t m = weights[t].size(0), n = weights[t].size(1), r = us[t].size(1);
    const bool bf16_w = weights[t].scalar_type() == at::kBFloat16;
    const int64_t r_pad = padded_rank(r);
    if (i0 < m) {
      const int64_t i1 = std::min(m, i0 + kPrepareRows);
      // 16-bit U's rows as float32, not zeroed: each is written before it is read (a zeroing vector cost a pass).
      const std::unique_ptr<float[]> scratch(us[t].scalar_type() == at::kFloat ? nullptr : new float[(i1 - i0) * r]);
      float* rows = uc[t].data_ptr<float>();
      dispatch(us[t].scalar_type(), [&](auto tag) {
        ZK_RUN(subzero_uc_rows, static_cast<const decltype(tag)*>(us[t].data_ptr()), core_panels[t].data_ptr<float>(),
               r, i0, i1, rows, scratch.get());
      });
      auto* bits = paths[t] == LowrankPath::kRegisterTiles ? nullptr
                                                           : reinterpret_cast<uint16_t*>(ucb[t].data_ptr<int16_t>());
      if (paths[t] == LowrankPath::kAmx) {
        ZK_RUN(subzero_operand_rows, rows + i0 * r, i1 - i0, r, bits + i0 * r_pad, r_pad);
      } else if (paths[t] == LowrankPath::kDot) {
        const std::unique_ptr<uint16_t[]> operand_rows(new uint16_t[(i1 - i0) * r]);
        operands(rows + i0 * r, (i1 - i0) * r, operand_rows.get());
        for (int64_t i = i0; i < i1; ++i) {
          dot_words(operand_rows.get() + (i - i0) * r, r, reinterpret_cast<uint32_t*>(bits + i * r_pad), 1);
        }
      } else if (bf16_w) {
        operands(rows + i0 * r, (i1 - i0) * r, rows + i0 * r);
      }
    }
    if (i0 < n) {
      dispatch(vs[t].scalar_type(), [&](auto tag) {
        const auto* v = static_cast<const decltype(tag)*>(vs[t].data_ptr());
        const int64_t p = i0 / simd::kPanelCols, width = std::min(simd::kPanelCols, n - i0);
        if (paths[t] == LowrankPath::kDot) {
          // Panel p's dot words: word w of slot s at w·kPanelCols + s.
          auto* words =
              reinterpret_cast<uint32_t*>(vt_blocks[t].data_ptr<int16_t>()) + p * r_pad / 2 * simd::kPanelCols;
          const std::unique_ptr<uint16_t[]> bits(new uint16_t[width * r]);
          operands(v + i0 * r, width * r, bits.get());
          for (int64_t l = 0; l < width; ++l) {
            dot_words(bits.get() + l * r, r, words + simd::panel_slot(l, true), simd::kPanelCols);
          }
        } else if (paths[t] == LowrankPath::kAmx) {
          // Panel p's blocks: per rank block, four runs of 16 slots, each 16 rows of pairs of rank indices, so a
          // row of V goes as 32-bit pairs, one per 64-byte row of its run.
          auto* blocks = reinterpret_cast<uint32_t*>(vt_blocks[t].data_ptr<int16_t>()) + p * r_pad * simd::kPanelCols / 2;
          std::vector<uint16_t> bits(r_pad, 0);
          for (int64_t l = 0; l < width; ++l) {
            const int64_t slot = simd::panel_slot(l, true), group = slot / 16, lane = slot % 16;
            operands(v + (i0 + l) * r, r, bits.data());
            for (int64_t k = 0; k < r_pad / 2; ++k) {
              memcpy(blocks + (k / 16 * 4 + group) * simd::kAmxBlockWords / 2 + k % 16 * 16 + lane, &bits[2 * k],
                     sizeof(uint32_t));
            }
          }
        } else {
          // The panel's rows of V as float32 (bfloat16 W: lowrank_operand values) in the level's vectors, then packed.
          const std::unique_ptr<float[]> rows(new float[width * r]);
          if (bf16_w) {
            operands(v + i0 * r, width * r, rows.get());
          } else {
            ZK_RUN(subzero_to_float, v + i0 * r, width * r, rows.get());
          }
          ZK_RUN(subzero_pack_vt, rows.get(), width, r, bf16_w, vt[t].data_ptr<float>() + p * r * simd::kPanelCols);
        }
      });
    }
  }

  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
#pragma omp parallel for schedule(dynamic, 1) if (num_tiles > 1)
  for (int64_t k = 0; k < num_tiles; ++k) {
    const int64_t t = tiles[k].t, i0 = tiles[k].row, j0 = tiles[k].col;
    const int64_t m = weights[t].size(0), n = weights[t].size(1), r = us[t].size(1);
#ifdef ZK_X86
    if (paths[t] == LowrankPath::kAmx) {
      simd::avx512::subzero_rows_amx(static_cast<bf16*>(weights[t].data_ptr()), n,
                                     padded_rank(r), i0,
                                     std::min(m, i0 + kRowBlock), j0, std::min(kColBlock, n - j0),
                                     reinterpret_cast<const uint16_t*>(ucb[t].data_ptr<int16_t>()),
                                     reinterpret_cast<const uint16_t*>(vt_blocks[t].data_ptr<int16_t>()),
                                     rounding == kStochastic, static_cast<uint64_t>(seed),
                                     static_cast<uint32_t>(ids[t]), first[t]);
      continue;
    }
#endif
    const bool on_dot = paths[t] == LowrankPath::kDot;
    const simd::DotOperands dot{on_dot ? reinterpret_cast<const uint32_t*>(ucb[t].data_ptr<int16_t>()) : nullptr,
                                on_dot ? reinterpret_cast<const uint32_t*>(vt_blocks[t].data_ptr<int16_t>()) : nullptr,
                                padded_rank(r) / 2};
    dispatch(weights[t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      ZK_RUN(subzero_rows, static_cast<T*>(weights[t].data_ptr()), n, r, i0, std::min(m, i0 + kRowBlock), j0,
             std::min(kColBlock, n - j0), uc[t].data_ptr<float>(), on_dot ? nullptr : vt[t].data_ptr<float>(),
             on_dot ? &dot : nullptr, rounding == kStochastic, static_cast<uint64_t>(seed),
             static_cast<uint32_t>(ids[t]), first[t]);
    });
  }
}

// Whether `path` computes bfloat16 low-rank updates bit for bit as the AVX-512 register tiles, on random factors of
// awkward shapes (the layouts; every rank block, stochastic rounding) and on sums whose bfloat16 result tells the
// order apart (sums that differ in float32 alone rarely show in bfloat16): with C = I and V = 1 a row's products are
// its U entries, whose cancelling pairs make the sum 1, 0, 0, 0, 0 in the SDM's order and 0, 1, 1, 1, 1 in another
// (row 0: one chain; row 1: even and odd indices over the whole rank; row 2: delta + e + o left to right; rows 3
// and 4: the even or the odd sum taking a later index first). The SDM's order is the definition; a CPU that
// computes otherwise says so and keeps the register tiles.
bool agrees_with_register_tiles(LowrankPath path, const char* what) {
  const auto gen = at::make_generator<at::CPUGeneratorImpl>(20261204);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t m = 37, n = 150, r = 70, k = 64;
  constexpr int kOrderRows = 5;
  at::Tensor u_order = at::zeros({kOrderRows, k}, f32);
  const float big = 1 << 24;
  const float pattern[kOrderRows][3][2] = {{{0, big}, {1, 1}, {2, -big}},
                                           {{0, big}, {1, 1}, {32, -big}},
                                           {{0, 2 * big}, {32, -2 * big}, {33, 1}},
                                           {{0, big}, {4, 1}, {6, -big}},
                                           {{1, big}, {5, 1}, {7, -big}}};
  for (int row = 0; row < kOrderRows; ++row) {
    for (const auto& entry : pattern[row]) u_order[row][static_cast<int64_t>(entry[0])] = entry[1];
  }
  const std::vector<at::Tensor> ws = {at::randn({m, n}, gen, f32).to(at::kBFloat16),
                                      at::zeros({kOrderRows, k}, at::kBFloat16)};
  const std::vector<at::Tensor> us = {at::randn({m, r}, gen, f32).to(at::kBFloat16), u_order.to(at::kBFloat16)};
  const std::vector<at::Tensor> vs = {at::randn({n, r}, gen, f32).to(at::kBFloat16), at::ones({k, k}, at::kBFloat16)};
  const std::vector<at::Tensor> cores = {at::randn({r, r}, gen, f32), at::eye(k, f32)};
  std::vector<at::Tensor> on_tiles, on_path;
  for (const at::Tensor& w : ws) {
    on_tiles.push_back(w.clone());
    on_path.push_back(w.clone());
  }
  lowrank_apply_with(on_tiles, us, vs, cores, {7, 8}, 1, {3, 0}, kStochastic, LowrankPath::kRegisterTiles);
  lowrank_apply_with(on_path, us, vs, cores, {7, 8}, 1, {3, 0}, kStochastic, path);
  bool same = true;
  for (size_t t = 0; t < ws.size(); ++t) {
    same = same && at::equal(on_tiles[t].view(at::kShort), on_path[t].view(at::kShort));
  }
  if (!same) {
    TORCH_WARN("zokern_cpp: this CPU's ", what, " sum bfloat16 products otherwise than Intel's SDM says; bfloat16 "
               "low-rank updates take the next path instead (dot products or the AVX-512 register tiles: the same "
               "bits, slower)");
  }
  return same;
}

// The CPU's fastest path for a bfloat16 W's low-rank sums, at an uncapped AVX-512 level: AMX where the CPU has
// AMX-BF16 and Linux grants the tile data, else AVX512-BF16 dot products (VDPBF16PS), either only if it agrees with
// the register tiles (agrees_with_register_tiles). ZOKERN_CPU_SIMD set keeps both off, but =avx512bf16 keeps the
// dot products (to test them on a CPU with AMX).
LowrankPath bf16_lowrank_path() {
  static const LowrankPath path = [] {
#ifdef ZK_X86
    if (simd_level() != Level::kAvx512) return LowrankPath::kRegisterTiles;
    const char* cap = std::getenv("ZOKERN_CPU_SIMD");
#ifdef __linux__  // the tile data is granted by arch_prctl
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool has_amx = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 22 & 1);
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    if (cap == nullptr && has_amx && syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0 &&
        agrees_with_register_tiles(LowrankPath::kAmx, "AMX tiles")) {
      return LowrankPath::kAmx;
    }
#endif
    if ((cap == nullptr || std::strcmp(cap, "avx512bf16") == 0) && __builtin_cpu_supports("avx512bf16") &&
        agrees_with_register_tiles(LowrankPath::kDot, "AVX512-BF16 dot products")) {
      return LowrankPath::kDot;
    }
#endif
    return LowrankPath::kRegisterTiles;
  }();
  return path;
}

void lowrank_apply_(at::TensorList weights, at::TensorList us, at::TensorList vs, at::TensorList cores,
                    at::IntArrayRef streams, int64_t seed, at::IntArrayRef offsets, int64_t rounding) {
  const bool bfloat16 = std::any_of(weights.begin(), weights.end(),
                                    [](const at::Tensor& w) { return w.scalar_type() == at::kBFloat16; });
  lowrank_apply_with(weights, us, vs, cores, streams, seed, offsets, rounding,
                     bfloat16 ? bf16_lowrank_path() : LowrankPath::kRegisterTiles);
}

// ---- anchored rescale (DiZO) ----

// ‖θ − θ0‖ per tensor: per-chunk sums (zo_cpu_kernels.inc's dizo_distance_sum: interleaved lanes, then the lanes
// in order), then each tensor's chunk sums in chunk order: the result depends on the chunk size only, never on
// the threads.
at::Tensor distance_norms(at::TensorList params, at::TensorList anchors, int64_t chunk) {
  check_params(params);
  check_companions(params, anchors, "anchors");
  chunk = chunk > 0 ? chunk : kDefaultChunk;
  std::vector<int64_t> first(params.size() + 1, 0);
  for (size_t t = 0; t < params.size(); ++t) first[t + 1] = first[t] + (params[t].numel() + chunk - 1) / chunk;
  std::vector<float> partial(first.back());
  for_chunks(params, chunk, 1, [&](int64_t t, int64_t begin, int64_t end) {
    dispatch(params[t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      ZK_RUN(dizo_distance_sum, static_cast<const T*>(params[t].data_ptr()),
             static_cast<const T*>(anchors[t].data_ptr()), begin, end, &partial[first[t] + begin / chunk]);
    });
  });
  at::Tensor out = at::empty({static_cast<int64_t>(params.size())}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (size_t t = 0; t < params.size(); ++t) {
    float sum = 0.f;
    for (int64_t c = first[t]; c < first[t + 1]; ++c) sum = add_rn(sum, partial[c]);
    o[t] = sqrt_rn(sum);
  }
  return out;
}

// Stored with `rounding`, keyed by (seed, streams[t], offsets[t] + index).
void anchored_rescale_(at::TensorList params, at::TensorList anchors, std::optional<at::TensorList> sources,
                       const at::Tensor& factors, at::IntArrayRef streams, int64_t seed, at::IntArrayRef offsets,
                       int64_t rounding, int64_t chunk) {
  check_params(params);
  const std::vector<int64_t> ids = per_tensor_or_zeros(streams, params.size(), "stream id");
  const std::vector<int64_t> first = element_offsets(offsets, params.size());
  check_companions(params, anchors, "anchors");
  std::vector<at::Tensor> src;  // the source of each tensor: sources[t], or the tensor itself
  if (sources.has_value()) {
    check_companions(params, *sources, "sources");
    src.assign(sources->begin(), sources->end());
  } else {
    src.assign(params.begin(), params.end());
  }
  const float* f = per_tensor(factors, params.size(), "factors");
  for_chunks(params, chunk, 1, [&](int64_t t, int64_t begin, int64_t end) {
    dispatch(params[t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      ZK_RUN(dizo_rescale_range, static_cast<T*>(params[t].data_ptr()), static_cast<const T*>(anchors[t].data_ptr()),
             static_cast<const T*>(src[t].data_ptr()), begin, end, f[t], rounding == kStochastic,
             static_cast<uint64_t>(seed), static_cast<uint32_t>(ids[t]), first[t]);
    });
  });
}

// ---- the random stream ----

void fill_random_(at::Tensor& out, int64_t seed, int64_t stream, int64_t offset, int64_t domain, int64_t dist) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "zokern_cpp: out must be a contiguous float32 CPU tensor");
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel();
  const int64_t num_chunks = (n + kDefaultChunk - 1) / kDefaultChunk;
#pragma omp parallel for schedule(static) if (num_chunks > 1)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t first = c * kDefaultChunk, last = std::min(n, first + kDefaultChunk);
    ZK_RUN(fill_range, o + first, offset + first, offset + last, static_cast<uint64_t>(seed),
           static_cast<uint32_t>(stream), static_cast<uint32_t>(domain), static_cast<int>(dist));
  }
}

// out[k] = the four words of Philox call first_call + k (an int64 n×4 tensor).
void philox_words_(at::Tensor& out, int64_t seed, int64_t stream, int64_t domain, int64_t first_call) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kLong && out.dim() == 2 &&
                  out.size(1) == 4,
              "zokern_cpp: out must be a contiguous int64 n×4 CPU tensor");
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t n = out.size(0);
#pragma omp parallel for schedule(static) if (n > 4096)
  for (int64_t k = 0; k < n; ++k) {
    const Words w = philox(static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
                           static_cast<uint32_t>(domain), static_cast<uint64_t>(first_call + k));
    for (int q = 0; q < 4; ++q) o[4 * k + q] = w.w[q];
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(zokern, CPU, m) { ZOKERN_IMPL_BACKEND_OPS(m, Loops) }
