// The emulator's scheduler: one fiber per CUDA thread, blocks run one after another.
//
// A block runs in rounds. Each round resumes every runnable thread (in forward, reverse or random
// order) until it reaches a barrier or returns. Then warp barriers whose lanes have all arrived
// open; failing that, the block barrier opens if every live thread waits at the same call site.
// If nothing can open, the block is deadlocked or its threads wait at different barriers: both
// are errors, as they are undefined behaviour on a GPU. The threads of a failed block that still
// wait at a barrier are then unwound, so that each fiber ends cleanly (also for the sanitizers).
#include "emu/emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

#ifdef CNNEXT_EMU_BOOST
#include <boost/context/detail/fcontext.hpp>
#else
#include <ucontext.h>
#endif

#ifdef CNNEXT_EMU_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#ifdef CNNEXT_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace cnnext::emu {
namespace {

[[noreturn]] void raise(const std::string& msg) { throw std::runtime_error(msg); }

// Thrown inside the threads of a failed block that still wait at a barrier, so that they unwind
// and finish like any thread: their destructors and sanitizer scopes run, and TSan sees them end.
struct Abandon {};

// ---- schedule ---------------------------------------------------------------------------------
enum class Order { Forward, Reverse, Random };
struct Schedule {
  Order order = Order::Forward;
  std::uint64_t seed = 0;
  std::string text = "forward";
};

Schedule parse_schedule(const std::string& s) {
  Schedule out;
  out.text = s;
  if (s == "forward") {
    out.order = Order::Forward;
  } else if (s == "reverse") {
    out.order = Order::Reverse;
  } else if (s.rfind("random", 0) == 0) {
    out.order = Order::Random;
    if (s.size() > 6) {
      if (s[6] != ':' || s.size() == 7) raise("cnnext emulator: bad schedule '" + s + "'");
      char* end = nullptr;
      out.seed = std::strtoull(s.c_str() + 7, &end, 10);
      if (*end != '\0') raise("cnnext emulator: bad schedule seed in '" + s + "'");
    }
  } else {
    raise("cnnext emulator: schedule must be 'forward', 'reverse' or 'random:SEED', got '" + s +
          "'");
  }
  return out;
}

Schedule& current_schedule() {
  thread_local Schedule schedule = [] {
    const char* env = std::getenv("CNNEXT_EMU_SCHEDULE");
    return parse_schedule(env && *env ? env : "forward");
  }();
  return schedule;
}

// ---- fiber stacks -------------------------------------------------------------------------------
std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("CNNEXT_EMU_STACK_KB");
#if defined(CNNEXT_EMU_ASAN) || defined(CNNEXT_EMU_TSAN)
    std::size_t kb = 1024;
#else
    std::size_t kb = 256;
#endif
    if (env && *env) kb = std::strtoull(env, nullptr, 10);
    return std::max<std::size_t>(kb, 64) * 1024;
  }();
  return bytes;
}

// mmap'd stacks with a guard page below, so an overflow faults instead of corrupting memory.
struct StackPool {
  std::vector<char*> free_list;
  ~StackPool() {
    for (char* s : free_list) munmap(s - page(), stack_bytes() + page());
  }
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  char* get() {
    if (!free_list.empty()) {
      char* s = free_list.back();
      free_list.pop_back();
      return s;
    }
    void* p = mmap(nullptr, stack_bytes() + page(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) raise("cnnext emulator: out of memory for fiber stacks");
    mprotect(p, page(), PROT_NONE);
    return static_cast<char*>(p) + page();
  }
  void put(char* s) { free_list.push_back(s); }
};
thread_local StackPool stack_pool;

// ---- per-thread and per-block state -------------------------------------------------------------
enum class Status : std::uint8_t { NotStarted, Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Thread {
  Status status = Status::NotStarted;
  const char* file = nullptr;  // call site of the barrier this thread waits at
  int line = 0;
  unsigned mask = 0;  // warp barriers: the lanes that take part
  char* stack = nullptr;
#ifdef CNNEXT_EMU_BOOST
  boost::context::detail::fcontext_t ctx = nullptr;
#else
  ucontext_t ctx;
#endif
#ifdef CNNEXT_EMU_TSAN
  void* tsan_fiber = nullptr;
#endif
#ifdef CNNEXT_EMU_ASAN
  void* asan_fake_stack = nullptr;
#endif
  // cp.async: copies in issue order from async_head on; committed groups' sizes from group_head.
  std::vector<AsyncCopy> async_copies;
  std::size_t async_head = 0;
  std::vector<std::size_t> async_groups;
  std::size_t group_head = 0;
};

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kSlotBytes = 16;

struct Block {
  const char* kernel = nullptr;
  void (*body)(void*) = nullptr;
  void* payload = nullptr;
  dim3 dims;
  unsigned n = 0;
  std::vector<Thread> threads;
  std::vector<unsigned> order;
  std::uint64_t block_generation = 0;
  std::uint64_t warp_generation[kMaxWarps] = {};
  // Shuffle lane slots, double-buffered by warp generation: a lane that races ahead to the next
  // shuffle writes the other buffer while slow lanes still read this one.
  unsigned char slots[2][kMaxThreads][kSlotBytes];
  std::vector<unsigned char> dynamic_smem;
  // warp_exchange's lane buffers, double-buffered like `slots`; allocated on first use.
  std::vector<unsigned char> exchange[2];
  std::uint64_t layout_seed = 0;  // 0: the fixed fragment layout; else a seeded permutation
  std::exception_ptr error;
  std::string error_site;
  bool abandoning = false;  // the block failed: suspended threads unwind (see abandon())
#ifdef CNNEXT_EMU_TSAN
  // Barrier generations alternate between two sync objects so that a thread released from
  // barrier k does not acquire what a faster thread released at barrier k + 1.
  char block_token[2] = {};
  char warp_token[kMaxWarps][2] = {};
  char done_token = 0;
#endif
#ifdef CNNEXT_EMU_BOOST
  boost::context::detail::fcontext_t scheduler_ctx = nullptr;
#else
  ucontext_t scheduler_ctx;
#endif
#ifdef CNNEXT_EMU_TSAN
  void* scheduler_tsan = nullptr;
#endif
#ifdef CNNEXT_EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  std::size_t scheduler_stack_size = 0;
#endif
};

// Under TSan, emulator bookkeeping touched by fibers (thread states, lane slots) is not kernel
// memory: fibers ignore their own accesses while inside the emulator, so only kernel code is
// checked. Sync annotations still count while accesses are ignored.
struct EmulatorScope {
#ifdef CNNEXT_EMU_TSAN
  EmulatorScope() { __tsan_ignore_thread_begin(); }
  ~EmulatorScope() { __tsan_ignore_thread_end(); }
#else
  EmulatorScope() {}  // user-provided: no unused-variable warning where the scope is empty
  ~EmulatorScope() {}
#endif
};

thread_local Block* tl_block = nullptr;  // the block being run on this OS thread
thread_local unsigned tl_tid = 0;        // the emulated thread now running

Block& current_block() {
  if (!tl_block) raise("cnnext emulator: a device function was called outside a kernel launch");
  return *tl_block;
}

std::string site(const char* file, int line) {
  std::ostringstream os;
  os << (file ? file : "?") << ":" << line;
  return os.str();
}

// ---- TSan fibers -------------------------------------------------------------------------------
#ifdef CNNEXT_EMU_TSAN
// A TSan fiber is costly to make and destroy (it maps its own shadow stack and trace: ~0.1-1 ms),
// and a launch needs one per emulated thread per block, so they are pooled per OS thread and
// reused across blocks and launches. A reused fiber synchronises with the scheduler when its new
// thread starts (resume), as a new fiber does by being created: what TSan checks is unchanged.
// The functions whose frames never return (fiber_entry, fiber_main, the last switch) are not
// instrumented, so a reused fiber's shadow call stack does not grow.
struct TsanFiberPool {
  std::vector<void*> free_list;
  void* get() {
    if (free_list.empty()) return __tsan_create_fiber(0);
    void* f = free_list.back();
    free_list.pop_back();
    return f;
  }
  void put(void* f) { free_list.push_back(f); }
};
thread_local TsanFiberPool tsan_fiber_pool;
#define CNNEXT_EMU_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define CNNEXT_EMU_NO_TSAN
#endif

// ---- context switching -------------------------------------------------------------------------
void fiber_main();

#ifdef CNNEXT_EMU_BOOST
namespace bctx = boost::context::detail;
CNNEXT_EMU_NO_TSAN void fiber_entry(bctx::transfer_t t) {
#ifdef CNNEXT_EMU_TSAN
  __tsan_ignore_thread_begin();
#endif
  tl_block->scheduler_ctx = t.fctx;
  fiber_main();
}
#else
CNNEXT_EMU_NO_TSAN void fiber_entry() {
#ifdef CNNEXT_EMU_TSAN
  __tsan_ignore_thread_begin();
#endif
  fiber_main();
}
#endif

// Fiber side: hand control back to the scheduler. `finished` marks the last switch.
CNNEXT_EMU_NO_TSAN void switch_to_scheduler(bool finished) {
  Block& b = *tl_block;
#ifdef CNNEXT_EMU_ASAN
  // The frames of a finished fiber never return, so their redzones would stay poisoned and give
  // false reports to the next fiber on this stack: clear the stack's shadow from here up.
  if (finished) __asan_handle_no_return();
  Thread& t = b.threads[tl_tid];
  __sanitizer_start_switch_fiber(finished ? nullptr : &t.asan_fake_stack, b.scheduler_stack_bottom,
                                 b.scheduler_stack_size);
#endif
#ifdef CNNEXT_EMU_TSAN
  __tsan_switch_to_fiber(b.scheduler_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CNNEXT_EMU_BOOST
  bctx::transfer_t back = bctx::jump_fcontext(b.scheduler_ctx, nullptr);
  tl_block->scheduler_ctx = back.fctx;
#else
  swapcontext(&b.threads[tl_tid].ctx, &b.scheduler_ctx);
#endif
  (void)finished;
#ifdef CNNEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(tl_block->threads[tl_tid].asan_fake_stack, nullptr, nullptr);
#endif
}

CNNEXT_EMU_NO_TSAN void fiber_main() {
#ifdef CNNEXT_EMU_ASAN
  {
    Block& b = *tl_block;
    __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
  }
#endif
  Block& b = *tl_block;
#ifdef CNNEXT_EMU_TSAN
  __tsan_ignore_thread_end();  // fiber_entry began ignoring; the kernel body is checked
#endif
  try {
    b.body(b.payload);
  } catch (const Abandon&) {
    // The block failed elsewhere; this thread has unwound.
  } catch (...) {
    EmulatorScope scope;
    if (!b.error) {
      b.error = std::current_exception();
      b.error_site = "thread (" + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) +
                     "," + std::to_string(threadIdx.z) + ")";
    }
  }
#ifdef CNNEXT_EMU_TSAN
  __tsan_release(&b.done_token);
  __tsan_ignore_thread_begin();
#endif
  b.threads[tl_tid].status = Status::Done;
#ifdef CNNEXT_EMU_TSAN
  __tsan_ignore_thread_end();  // a fiber must not end while ignoring
#endif
  switch_to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

// Scheduler side: run thread `tid` until it reaches a barrier or returns.
void resume(Block& b, unsigned tid) {
  Thread& t = b.threads[tid];
  const unsigned x = tid % b.dims.x, y = (tid / b.dims.x) % b.dims.y,
                 z = tid / (b.dims.x * b.dims.y);
  threadIdx = dim3(x, y, z);
  tl_tid = tid;
  const bool starting = t.status == Status::NotStarted;
  if (starting) {
    t.stack = stack_pool.get();
#ifdef CNNEXT_EMU_BOOST
    t.ctx = bctx::make_fcontext(t.stack + stack_bytes(), stack_bytes(), &fiber_entry);
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = stack_bytes();
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, &fiber_entry, 0);
#endif
#ifdef CNNEXT_EMU_TSAN
    t.tsan_fiber = tsan_fiber_pool.get();
#endif
  }
  t.status = Status::Runnable;
#ifdef CNNEXT_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, t.stack, stack_bytes());
#endif
#ifdef CNNEXT_EMU_TSAN
  // Only a thread's start synchronises: it happens after the launch and after earlier blocks.
  __tsan_switch_to_fiber(t.tsan_fiber, starting ? 0 : __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CNNEXT_EMU_BOOST
  bctx::transfer_t back = bctx::jump_fcontext(t.ctx, nullptr);
  t.ctx = back.fctx;
#else
  swapcontext(&b.scheduler_ctx, &t.ctx);
#endif
#ifdef CNNEXT_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
#ifndef CNNEXT_EMU_TSAN
  // Under TSan a stack is reused only after the block, when its fibers are known to be done;
  // reusing it sooner would look like a race between two threads of the block.
  if (t.status == Status::Done) {
    stack_pool.put(t.stack);
    t.stack = nullptr;
  }
#endif
}

// After a block: every started fiber has finished (abandon() unwinds those of a failed block).
void release_stacks(Block& b) {
#ifdef CNNEXT_EMU_TSAN
  __tsan_acquire(&b.done_token);  // what the block's threads wrote happens before what follows
#endif
  for (unsigned i = 0; i < b.n; ++i) {
    Thread& t = b.threads[i];
    if (t.stack) stack_pool.put(t.stack);
    t.stack = nullptr;
#ifdef CNNEXT_EMU_TSAN
    if (t.tsan_fiber) tsan_fiber_pool.put(t.tsan_fiber);
    t.tsan_fiber = nullptr;
#endif
  }
}

// ---- barriers -----------------------------------------------------------------------------------
void wait_at(Status status, unsigned mask, const char* file, int line) {
  Block& b = current_block();
  if (b.abandoning) throw Abandon{};  // a destructor of an unwinding thread reached a barrier
  Thread& t = b.threads[tl_tid];
  t.status = status;
  t.file = file;
  t.line = line;
  t.mask = mask;
  switch_to_scheduler(false);
  if (tl_block->abandoning) throw Abandon{};
}

unsigned warp_of(unsigned tid) { return tid / 32; }

[[noreturn]] void report_stuck(Block& b) {
  std::ostringstream os;
  os << "cnnext emulator: kernel " << b.kernel << " block (" << blockIdx.x << "," << blockIdx.y
     << "," << blockIdx.z << ") cannot make progress: ";
  // Group waiting threads by call site so the message points at the offending barriers.
  std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
  for (unsigned i = 0; i < b.n; ++i) {
    const Thread& t = b.threads[i];
    if (t.status != Status::AtBlockBarrier && t.status != Status::AtWarpBarrier) continue;
    std::string key =
        std::string(t.status == Status::AtBlockBarrier ? "__syncthreads" : "warp barrier") +
        " at " + site(t.file, t.line);
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == key; });
    if (it == groups.end()) {
      groups.push_back({key, {i}});
    } else {
      it->second.push_back(i);
    }
  }
  unsigned done = 0;
  for (unsigned i = 0; i < b.n; ++i) done += b.threads[i].status == Status::Done;
  bool warp_waiters = false;
  for (auto& g : groups) warp_waiters |= g.first.rfind("warp", 0) == 0;
  if (groups.size() > 1 && !warp_waiters) {
    os << "threads wait at different __syncthreads (barrier mismatch): ";
  } else {
    os << "deadlock (no barrier can open): ";
  }
  for (auto& [key, tids] : groups) {
    os << tids.size() << " thread(s) [first " << tids.front() << "] at " << key << "; ";
  }
  os << done << " thread(s) exited";
  raise(os.str());
}

// Opens at most one warp barrier or the block barrier; false when none can open.
bool open_barriers(Block& b) {
  bool opened = false;
  const unsigned warps = (b.n + 31) / 32;
  for (unsigned w = 0; w < warps; ++w) {
    const unsigned first = w * 32, last = std::min(b.n, first + 32);
    int lead = -1;
    for (unsigned i = first; i < last; ++i) {
      if (b.threads[i].status == Status::AtWarpBarrier) {
        lead = static_cast<int>(i);
        break;
      }
    }
    if (lead < 0) continue;
    const Thread& L = b.threads[lead];
    bool complete = true;
    for (unsigned i = first; i < last; ++i) {
      const Thread& t = b.threads[i];
      const bool member = (L.mask >> (i - first)) & 1u;
      if (t.status == Status::AtWarpBarrier &&
          (t.mask != L.mask || t.line != L.line || t.file != L.file)) {
        raise("cnnext emulator: kernel " + std::string(b.kernel) + ": lanes of warp " +
              std::to_string(w) + " wait at different warp operations: " + site(L.file, L.line) +
              " (mask " + std::to_string(L.mask) + ") and " + site(t.file, t.line) + " (mask " +
              std::to_string(t.mask) + ")");
      }
      if (!member) continue;
      if (t.status == Status::Done) {
        raise("cnnext emulator: kernel " + std::string(b.kernel) + ": lane " +
              std::to_string(i - first) + " of warp " + std::to_string(w) +
              " exited but is named in the mask of the warp operation at " + site(L.file, L.line));
      }
      if (t.status != Status::AtWarpBarrier) complete = false;
    }
    if (!complete) continue;
    for (unsigned i = first; i < last; ++i) {
      if (b.threads[i].status == Status::AtWarpBarrier) b.threads[i].status = Status::Runnable;
    }
    ++b.warp_generation[w];
    opened = true;
  }
  if (opened) return true;

  unsigned live = 0, at_barrier = 0;
  const Thread* lead = nullptr;
  for (unsigned i = 0; i < b.n; ++i) {
    const Thread& t = b.threads[i];
    if (t.status == Status::Done) continue;
    ++live;
    if (t.status != Status::AtBlockBarrier) continue;
    ++at_barrier;
    if (!lead) lead = &t;
    if (t.file != lead->file || t.line != lead->line) report_stuck(b);
  }
  if (live == 0 || at_barrier != live) return false;
  for (unsigned i = 0; i < b.n; ++i) {
    if (b.threads[i].status == Status::AtBlockBarrier) b.threads[i].status = Status::Runnable;
  }
  ++b.block_generation;
  return true;
}

// Runs the block's threads in rounds until all are done, a thread raised (b.error) or the
// scheduler finds the block stuck (throws).
void run_rounds(Block& b, std::uint64_t block_linear, const Schedule& sched) {
  for (unsigned i = 0; i < b.n; ++i) b.threads[i] = Thread{};
  b.block_generation = 0;
  std::fill(std::begin(b.warp_generation), std::end(b.warp_generation), 0);
  b.error = nullptr;
  if (!b.dynamic_smem.empty()) std::fill(b.dynamic_smem.begin(), b.dynamic_smem.end(), 0xFF);
  std::mt19937_64 rng(sched.seed * 0x9E3779B97F4A7C15ull + block_linear);

  for (std::uint64_t round = 0;; ++round) {
    b.order.clear();
    for (unsigned i = 0; i < b.n; ++i) {
      const Status s = b.threads[i].status;
      if (s == Status::NotStarted || s == Status::Runnable) b.order.push_back(i);
    }
    if (sched.order == Order::Reverse) std::reverse(b.order.begin(), b.order.end());
    if (sched.order == Order::Random) std::shuffle(b.order.begin(), b.order.end(), rng);
    for (unsigned tid : b.order) {
      resume(b, tid);
      if (b.error) return;
    }
    bool all_done = true;
    for (unsigned i = 0; i < b.n && all_done; ++i) all_done = b.threads[i].status == Status::Done;
    if (all_done) return;
    if (!open_barriers(b)) report_stuck(b);
  }
}

// A failed block: resume each thread still waiting at a barrier once more, so that it unwinds
// (wait_at throws Abandon) and finishes. Its stack is then clean for reuse (ASan), and under TSan
// it ends no longer ignoring accesses and releases what it wrote to the launching thread.
void abandon(Block& b) {
  b.abandoning = true;
  for (unsigned i = 0; i < b.n; ++i) {
    const Status s = b.threads[i].status;
    if (s != Status::NotStarted && s != Status::Done) resume(b, i);
  }
  b.abandoning = false;
}

void run_block(Block& b, std::uint64_t block_linear, const Schedule& sched) {
  std::exception_ptr stuck;
  try {
    run_rounds(b, block_linear, sched);
  } catch (...) {
    stuck = std::current_exception();
  }
  if (stuck || b.error) abandon(b);
  if (stuck) std::rethrow_exception(stuck);
}

// ---- launch recorder ----------------------------------------------------------------------------
struct Recorder {
  std::vector<std::string> lines;   // one per launch or GEMM call, in call order
  std::vector<std::size_t> starts;  // per open recording: the first line it owns
};
thread_local Recorder recorder;

void record_line(std::string line) {
  if (!recorder.starts.empty()) recorder.lines.push_back(std::move(line));
}

std::string recorded_since(std::int64_t token) {
  if (token < 0 || static_cast<std::size_t>(token) >= recorder.starts.size())
    raise("cnnext emulator: no open recording with token " + std::to_string(token));
  std::string out;
  for (std::size_t i = recorder.starts[token]; i < recorder.lines.size(); ++i) {
    out += recorder.lines[i];
    out += '\n';
  }
  return out;
}

std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

// ---- public API ---------------------------------------------------------------------------------
void set_schedule(const std::string& schedule) { current_schedule() = parse_schedule(schedule); }
std::string get_schedule() { return current_schedule().text; }

namespace {
thread_local bool tl_tf32 = false;
}  // namespace
void set_tf32(bool enabled) { tl_tf32 = enabled; }
bool tf32_enabled() { return tl_tf32; }

const char* fiber_backend() {
#ifdef CNNEXT_EMU_BOOST
  return "boost.context";
#else
  return "ucontext";
#endif
}

void launch(const char* kernel_name, dim3 grid, dim3 block, std::size_t smem, void (*body)(void*),
            void* payload) {
  const std::string name = kernel_name ? kernel_name : "kernel";
  auto invalid = [&](const std::string& why) {
    raise("cnnext emulator: invalid launch of " + name + ": " + why +
          " (a GPU would fail with cudaErrorInvalidConfiguration)");
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) invalid("a grid dimension is 0");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    invalid("grid dimensions exceed (2^31-1, 65535, 65535)");
  if (block.x == 0 || block.y == 0 || block.z == 0) invalid("a block dimension is 0");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u)
    invalid("block dimensions exceed (1024, 1024, 64)");
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  if (threads > 1024u) invalid(std::to_string(threads) + " threads per block exceed 1024");
  if (smem > 48u * 1024u)
    invalid(std::to_string(smem) + " bytes of dynamic shared memory exceed 48 KiB");
  if (tl_block) raise("cnnext emulator: kernel " + name + " launched from inside a kernel");
  if (!recorder.starts.empty()) {
    std::ostringstream os;
    os << "kernel\t" << name << '\t' << grid.x << ' ' << grid.y << ' ' << grid.z << '\t' << block.x
       << ' ' << block.y << ' ' << block.z << '\t' << smem;
    record_line(os.str());
  }

#ifdef CNNEXT_EMU_PLAIN_SHARED
  // Plain static shared memory is one copy per process: one launch at a time.
  std::lock_guard<std::mutex> lock(launch_mutex());
#else
  (void)launch_mutex;
#endif
#ifdef CNNEXT_EMU_TSAN
  // The scheduler's own bookkeeping is not kernel memory: only fibers are checked for races.
  __tsan_ignore_thread_begin();
#endif

  const Schedule sched = current_schedule();
  auto state = std::make_unique<Block>();
  Block& b = *state;
  b.kernel = name.c_str();
  b.body = body;
  b.payload = payload;
  b.dims = block;
  b.n = static_cast<unsigned>(threads);
  b.threads.resize(b.n);
  b.order.reserve(b.n);
  b.dynamic_smem.assign(smem, 0xFF);
  b.layout_seed =
      sched.order == Order::Random ? (sched.seed ^ 0x5DEECE66Dull) * 0x9E3779B97F4A7C15ull | 1u : 0;
#ifdef CNNEXT_EMU_TSAN
  b.scheduler_tsan = __tsan_get_current_fiber();
#endif

  const std::uint64_t nblocks = std::uint64_t(grid.x) * grid.y * grid.z;
  std::vector<std::uint64_t> block_order;
  if (sched.order != Order::Forward) {
    block_order.resize(nblocks);
    std::iota(block_order.begin(), block_order.end(), 0);
    if (sched.order == Order::Reverse)
      std::reverse(block_order.begin(), block_order.end());
    else {
      std::mt19937_64 rng(sched.seed);
      std::shuffle(block_order.begin(), block_order.end(), rng);
    }
  }
  gridDim = grid;
  blockDim = block;
  tl_block = &b;
  try {
    for (std::uint64_t k = 0; k < nblocks; ++k) {
      const std::uint64_t lin = block_order.empty() ? k : block_order[k];
      blockIdx =
          dim3(static_cast<unsigned>(lin % grid.x), static_cast<unsigned>((lin / grid.x) % grid.y),
               static_cast<unsigned>(lin / (std::uint64_t(grid.x) * grid.y)));
      run_block(b, lin, sched);
      release_stacks(b);
      if (b.error) {
        std::string where = " in kernel " + name + ", block (" + std::to_string(blockIdx.x) + "," +
                            std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "), " +
                            b.error_site;
        try {
          std::rethrow_exception(b.error);
        } catch (const std::exception& e) {
          raise(std::string(e.what()) + where);
        }
      }
    }
  } catch (...) {
    release_stacks(b);
    tl_block = nullptr;
#ifdef CNNEXT_EMU_TSAN
    __tsan_ignore_thread_end();
#endif
    throw;
  }
  tl_block = nullptr;
#ifdef CNNEXT_EMU_TSAN
  __tsan_ignore_thread_end();
#endif
}

void block_barrier(const char* file, int line) {
  EmulatorScope scope;
  Block& b = current_block();
#ifdef CNNEXT_EMU_TSAN
  const std::uint64_t gen = b.block_generation;
  __tsan_release(&b.block_token[gen & 1]);
#endif
  wait_at(Status::AtBlockBarrier, 0, file, line);
#ifdef CNNEXT_EMU_TSAN
  __tsan_acquire(&tl_block->block_token[gen & 1]);
#endif
  (void)b;
}

void warp_barrier(unsigned mask, const char* file, int line) {
  EmulatorScope scope;
  Block& b = current_block();
  const unsigned w = warp_of(tl_tid);
  const unsigned lane = tl_tid % 32;
  if (!((mask >> lane) & 1u)) {
    raise("cnnext emulator: lane " + std::to_string(lane) + " calls a warp operation at " +
          site(file, line) + " with a mask that does not include it");
  }
#ifdef CNNEXT_EMU_TSAN
  const std::uint64_t gen = b.warp_generation[w];
  __tsan_release(&b.warp_token[w][gen & 1]);
#endif
  wait_at(Status::AtWarpBarrier, mask, file, line);
#ifdef CNNEXT_EMU_TSAN
  __tsan_acquire(&tl_block->warp_token[w][gen & 1]);
#endif
  (void)w;
  (void)b;
}

void warp_shuffle(unsigned mask, const void* in, void* out, std::size_t bytes, int kind, int arg,
                  int width, const char* file, int line) {
  EmulatorScope scope;
  Block& b = current_block();
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    raise("cnnext emulator: shuffle width must be a power of two in [1, 32], got " +
          std::to_string(width) + " at " + site(file, line));
  }
  const unsigned tid = tl_tid, w = warp_of(tid), lane = tid % 32;
  const std::uint64_t gen = b.warp_generation[w];
  std::memcpy(b.slots[gen & 1][tid], in, bytes);
  warp_barrier(mask, file, line);
  // Source lane, with CUDA's segment rules: lanes are split into segments of `width`.
  const int seg = static_cast<int>(lane) / width * width;
  const int pos = static_cast<int>(lane) - seg;
  int src = static_cast<int>(lane);
  switch (kind) {
    case 0:
      src = seg + ((arg % width) + width) % width;
      break;
    case 1:
      src = pos - arg >= 0 ? static_cast<int>(lane) - arg : static_cast<int>(lane);
      break;
    case 2:
      src = pos + arg < width ? static_cast<int>(lane) + arg : static_cast<int>(lane);
      break;
    case 3: {
      const int x = static_cast<int>(lane) ^ arg;
      src = (x / width == static_cast<int>(lane) / width) ? x : static_cast<int>(lane);
      break;
    }
    default:
      raise("cnnext emulator: bad shuffle kind");
  }
  const unsigned src_tid = w * 32 + static_cast<unsigned>(src);
  if (src_tid >= b.n || !((mask >> src) & 1u)) {
    raise("cnnext emulator: shuffle at " + site(file, line) + " reads lane " + std::to_string(src) +
          ", which is not in the mask (undefined on a GPU)");
  }
  std::memcpy(out, b.slots[gen & 1][src_tid], bytes);
}

unsigned warp_vote(unsigned mask, bool pred, int kind, const char* file, int line) {
  EmulatorScope scope;
  Block& b = current_block();
  const unsigned tid = tl_tid, w = warp_of(tid);
  const std::uint64_t gen = b.warp_generation[w];
  b.slots[gen & 1][tid][0] = pred ? 1 : 0;
  warp_barrier(mask, file, line);
  unsigned ballot = 0, members = 0;
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned t = w * 32 + l;
    if (t >= b.n || !((mask >> l) & 1u)) continue;
    members |= 1u << l;
    if (b.slots[gen & 1][t][0]) ballot |= 1u << l;
  }
  if (kind == 0) return ballot;
  if (kind == 1) return ballot != 0;
  return ballot == members;
}

std::int64_t record_start() {
  recorder.starts.push_back(recorder.lines.size());
  return static_cast<std::int64_t>(recorder.starts.size() - 1);
}

std::string record_peek(std::int64_t token) { return recorded_since(token); }

std::string record_stop(std::int64_t token) {
  std::string out = recorded_since(token);
  // Also closes recordings opened after this one and left open (an exception skipped their end).
  recorder.starts.resize(static_cast<std::size_t>(token));
  if (recorder.starts.empty()) recorder.lines.clear();
  return out;
}

void record_gemm(char transa, char transb, std::int64_t m, std::int64_t n, std::int64_t k,
                 std::int64_t batch) {
  if (recorder.starts.empty()) return;
  std::ostringstream os;
  os << "gemm\tgemm_strided_batched\t" << transa << ' ' << transb << ' ' << m << ' ' << n << ' '
     << k << ' ' << batch;
  record_line(os.str());
}

const char* kernel_name() { return tl_block ? tl_block->kernel : ""; }

constexpr std::size_t kExchangeBytes = 128;

void warp_exchange(const void* mine, std::size_t bytes, void* all, const char* op, const char* file,
                   int line) {
  EmulatorScope scope;
  Block& b = current_block();
  const unsigned tid = tl_tid, w = warp_of(tid);
  const std::string what = "cnnext emulator: kernel " + std::string(b.kernel) + ": " + op + " at " +
                           site(file, line) + ": ";
  if (bytes > kExchangeBytes) raise(what + "exchange of more than 128 bytes per lane");
  if ((w + 1) * 32 > b.n) {
    raise(what + "a warp-collective operation needs all 32 lanes, but warp " + std::to_string(w) +
          " of this block has " + std::to_string(b.n - w * 32) + " threads");
  }
  for (auto& buf : b.exchange) {
    if (buf.size() < b.n * kExchangeBytes) buf.resize(b.n * kExchangeBytes);
  }
  const std::uint64_t gen = b.warp_generation[w];
  std::memcpy(&b.exchange[gen & 1][tid * kExchangeBytes], mine, bytes);
  warp_barrier(0xffffffffu, file, line);
  for (unsigned l = 0; l < 32; ++l) {
    std::memcpy(static_cast<unsigned char*>(all) + l * bytes,
                &tl_block->exchange[gen & 1][(w * 32 + l) * kExchangeBytes], bytes);
  }
}

const std::uint16_t* fragment_layout(std::uint32_t tag, unsigned per_lane, unsigned elements) {
  EmulatorScope scope;
  const Block& b = current_block();
  using Key = std::tuple<std::uint64_t, std::uint32_t, unsigned, unsigned>;
  thread_local std::map<Key, std::vector<std::uint16_t>> tables;
  auto [it, fresh] = tables.try_emplace(Key{b.layout_seed, tag, per_lane, elements});
  std::vector<std::uint16_t>& table = it->second;
  if (fresh) {
    // Slots beyond `elements` (half fragments) hold each element a second time.
    table.resize(std::size_t(32) * per_lane);
    std::iota(table.begin(), table.end(), std::uint16_t(0));
    if (b.layout_seed != 0) {
      std::mt19937_64 rng(b.layout_seed + tag * 0xBF58476D1CE4E5B9ull);
      std::shuffle(table.begin(), table.end(), rng);
    }
    for (auto& e : table) e = static_cast<std::uint16_t>(e % elements);
  }
  return table.data();
}

void async_copy(void* dst, const void* src, std::size_t bytes, const char* file, int line) {
  EmulatorScope scope;
  Block& b = current_block();
  const auto misaligned = [&](const void* p) {
    return reinterpret_cast<std::uintptr_t>(p) % bytes != 0;
  };
  if (misaligned(dst) || misaligned(src)) {
    raise("cnnext emulator: kernel " + std::string(b.kernel) + ": cp.async at " + site(file, line) +
          ": a " + std::to_string(bytes) + "-byte copy needs source and destination aligned to " +
          std::to_string(bytes) + " bytes");
  }
  b.threads[tl_tid].async_copies.push_back({dst, src, bytes});
}

void async_commit() {
  EmulatorScope scope;
  Thread& t = current_block().threads[tl_tid];
  std::size_t grouped = t.async_head;
  for (std::size_t g = t.group_head; g < t.async_groups.size(); ++g) grouped += t.async_groups[g];
  t.async_groups.push_back(t.async_copies.size() - grouped);
}

bool async_pop(int keep, AsyncCopy* out) {
  EmulatorScope scope;
  Thread& t = current_block().threads[tl_tid];
  const std::size_t keep_groups = static_cast<std::size_t>(std::max(keep, 0));
  while (t.async_groups.size() - t.group_head > keep_groups) {
    if (t.async_groups[t.group_head] == 0) {
      ++t.group_head;
      continue;
    }
    --t.async_groups[t.group_head];
    *out = t.async_copies[t.async_head++];
    return true;
  }
  return false;
}

void* dynamic_shared() {
  Block& b = current_block();
  return b.dynamic_smem.empty() ? nullptr : b.dynamic_smem.data();
}

void fail(const std::string& message) { raise(message); }

}  // namespace cnnext::emu
