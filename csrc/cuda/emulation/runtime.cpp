// The CUDA emulator (issue 9): fibers, the block/warp scheduler, warp collectives (shfl_sync,
// mma.sync), guarded memory with out-of-bounds reports, the race checker and the device records.
// See runtime.h for the model; README ("CUDA emulation") for what it shows and what it does not.
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <tuple>
#include <unordered_map>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#pragma GCC visibility push(hidden)

namespace fusedrnn_emu {

ThreadState* g_thread = nullptr;
unsigned g_grid_dim = 0;
unsigned g_block_dim = 0;


// =============================================================================== options, device
std::mutex g_state_mu;  // device record, options, statistics

Options& options_unlocked() {
  static Options o = [] {
    Options d;
    if (const char* s = std::getenv("FUSEDRNN_CUDA_EMULATION_SEED")) d.seed = std::strtoull(s, nullptr, 10);
    return d;
  }();
  return o;
}

DeviceProps preset(const std::string& name) {
  DeviceProps p;
  p.name = name;
  p.regs_per_sm = 65536;
  p.max_regs_per_thread = 255;
  p.max_threads_per_sm = 2048;
  p.max_blocks_per_sm = 32;
  p.smem_reserved = 1024;
  // cudaGetDeviceProperties of the SXM parts (the records of fusedrnn.backends.cuda.KNOWN_DEVICES).
  if (name == "H100" || name == "H200") {  // 132 SMs, 228 KB shared memory per SM, 227 KB per block
    p.sms = 132;
    p.smem_per_sm = 233472;
    p.smem_optin = 232448;
    p.cc_major = 9;
    p.total_memory = name == "H100" ? 85045166080LL : 150110011392LL;  // 80 GB HBM3 / 141 GB HBM3e
    p.l2_bytes = 52428800;
  } else if (name == "A100") {  // 108 SMs, 164 KB per SM, 163 KB per block
    p.sms = 108;
    p.smem_per_sm = 167936;
    p.smem_optin = 166912;
    p.cc_major = 8;
    p.total_memory = 85097971712LL;
    p.l2_bytes = 41943040;
  } else {
    TORCH_CHECK(false, "fusedrnn CUDA emulation: unknown device ", name, " (H100, H200 or A100)");
  }
  return p;
}

DeviceProps& device_unlocked() {
  static DeviceProps d = [] {
    const char* name = std::getenv("FUSEDRNN_CUDA_EMULATION_DEVICE");
    DeviceProps p = preset(name && *name ? name : "H100");
    if (const char* s = std::getenv("FUSEDRNN_CUDA_EMULATION_SMS")) {
      const int sms = std::atoi(s);
      if (sms > 0) p.sms = sms;
    }
    return p;
  }();
  return d;
}

std::string record_name(const DeviceProps& p) {
  return "emulated " + p.name + " with " + std::to_string(p.sms) + " SMs";
}

// A distinct device index per configuration: the host code caches limits per device index.
int config_id(const DeviceProps& p) {
  static std::map<std::tuple<std::string, int>, int> ids;
  auto key = std::make_tuple(p.name, p.sms);
  auto it = ids.find(key);
  if (it == ids.end()) it = ids.emplace(key, static_cast<int>(ids.size())).first;
  return it->second;
}

std::map<std::string, long> g_launch_counts;
std::vector<LaunchRecord> g_launch_log;

// ==================================================================================== guarded memory
size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
constexpr size_t kGuardBytes = 64 << 10;  // inaccessible bytes before and after every buffer

// One guarded allocation: [lead guard][accessible pages ... data (size bytes)][trail guard], the
// data ending exactly at the trailing guard (up to alignment), so reading or writing one element
// past the end faults.  Accessible bytes before the data are poisoned and diffed (underruns).
struct Buffer {
  int id = 0;
  uintptr_t map_base = 0;
  size_t map_len = 0;
  uintptr_t begin = 0;  // first accessible byte
  uintptr_t data = 0;
  size_t size = 0;
  std::string label;    // what it is, for reports ("" = an internal buffer of the op)
  int elem = 0;         // element size when known
  bool op_buffer = true;  // allocated by the op (global memory) vs shared memory of a block
};

std::mutex g_buf_mu;
std::map<uintptr_t, std::shared_ptr<Buffer>> g_buffers;  // live op buffers by data address
int g_next_buffer_id = 0;

std::shared_ptr<Buffer> map_buffer(size_t size, size_t align) {
  const size_t ps = page_size();
  const size_t body = (size + align + ps - 1) / ps * ps;
  const size_t len = kGuardBytes + body + kGuardBytes;
  void* base = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(base != MAP_FAILED, "fusedrnn CUDA emulation: mmap of ", len, " bytes failed");
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  TORCH_CHECK(mprotect(reinterpret_cast<void*>(b + kGuardBytes), body, PROT_READ | PROT_WRITE) == 0,
              "fusedrnn CUDA emulation: mprotect failed");
  auto buf = std::make_shared<Buffer>();
  buf->map_base = b;
  buf->map_len = len;
  buf->begin = b + kGuardBytes;
  const uintptr_t end = buf->begin + body;
  buf->data = (end - size) & ~uintptr_t(align - 1);
  buf->size = size;
  std::memset(reinterpret_cast<void*>(buf->begin), 0xff, body);  // poison: NaN in every float type
  return buf;
}

void unmap_buffer(const Buffer& b) { munmap(reinterpret_cast<void*>(b.map_base), b.map_len); }

// Alignment of a tensor allocation of `n` bytes: the largest power of two dividing n (so the
// element size divides it), at most 64, so the data can end exactly at the guard.
size_t tensor_alignment(size_t n) {
  size_t a = 1;
  while (a < 64 && n % (a * 2) == 0) a *= 2;
  return a;
}

struct ScopeState;
ScopeState* g_scope = nullptr;
void scope_keep(const std::shared_ptr<Buffer>& b);

void free_buffer(void* ctx) {
  auto* raw = static_cast<Buffer*>(ctx);
  std::lock_guard<std::mutex> lock(g_buf_mu);
  auto it = g_buffers.find(raw->data);
  if (it != g_buffers.end() && it->second.get() == raw) {
    unmap_buffer(*raw);
    raw->map_base = 0;
    g_buffers.erase(it);
  }
}
void free_nothing(void*) {}

// CPU allocator installed while an emulated op runs (OpScope): every tensor the op allocates
// (outputs, workspaces, converted copies) is a guarded buffer.
class TrackingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return c10::DataPtr(nullptr, nullptr, &free_nothing, c10::Device(c10::kCPU));
    std::shared_ptr<Buffer> buf = map_buffer(n, tensor_alignment(n));
    {
      std::lock_guard<std::mutex> lock(g_buf_mu);
      buf->id = g_next_buffer_id++;
      g_buffers[buf->data] = buf;
    }
    scope_keep(buf);
    return c10::DataPtr(reinterpret_cast<void*>(buf->data), buf.get(), &free_buffer, c10::Device(c10::kCPU));
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};
TrackingAllocator g_tracking;

// ================================================================================= kernel names
std::string demangle(const char* sym) {
  int status = 0;
  char* d = abi::__cxa_demangle(sym, nullptr, nullptr, &status);
  std::string out = (status == 0 && d) ? d : sym;
  std::free(d);
  return out;
}

// "void ns::(anonymous namespace)::lstm_fwd_kernel<ns::dev::bf16, ns::cuda_detail::MmaEngine16<...> >(args)"
// -> "lstm_fwd_kernel<bf16, MmaEngine16<bf16, 4>>"
std::string short_kernel_name(std::string s) {
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    else if (s[i] == '>') --depth;
    else if (s[i] == '(' && depth == 0 && s.compare(i, 20, "(anonymous namespace") != 0) {
      s = s.substr(0, i);
      break;
    }
  }
  std::string out;
  size_t i = 0;
  while (i < s.size()) {  // drop every namespace qualifier "x::"
    size_t j = i;
    if (s.compare(i, 21, "(anonymous namespace)") == 0) {
      j = i + 21;
    } else {
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
    }
    if (j > i && s.compare(j, 2, "::") == 0) {
      i = j + 2;
      continue;
    }
    if (j > i) {
      out.append(s, i, j - i);
      i = j;
    } else {
      if (!(s[i] == ' ' && i + 1 < s.size() && s[i + 1] == '>')) out.push_back(s[i]);
      ++i;
    }
  }
  return out;
}

// Function symbols (address relative to the object's load base -> mangled name) of a shared
// object's ELF .symtab and .dynsym: local (static, anonymous-namespace) functions are not in the
// dynamic symbol table.
std::map<uintptr_t, std::string> read_function_symbols(const char* path) {
  std::map<uintptr_t, std::string> syms;
  const int fd = open(path, O_RDONLY);
  struct stat st {};
  if (fd >= 0 && fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) > sizeof(Elf64_Ehdr)) {
    void* m = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m != MAP_FAILED) {
      const auto* base = static_cast<const unsigned char*>(m);
      const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
      if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64 &&
          eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) <= static_cast<size_t>(st.st_size)) {
        const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
        for (int i = 0; i < eh->e_shnum; ++i) {
          if (sh[i].sh_type != SHT_SYMTAB && sh[i].sh_type != SHT_DYNSYM) continue;
          const auto* sym = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
          const char* str = reinterpret_cast<const char*>(base + sh[sh[i].sh_link].sh_offset);
          const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
          for (size_t k = 0; k < n; ++k) {
            if (ELF64_ST_TYPE(sym[k].st_info) == STT_FUNC && sym[k].st_value != 0 && sym[k].st_name != 0) {
              syms.emplace(sym[k].st_value, str + sym[k].st_name);
            }
          }
        }
      }
      munmap(m, st.st_size);
    }
  }
  if (fd >= 0) close(fd);
  return syms;
}

std::string symbol_name(const void* addr) {
  static std::mutex mu;
  static std::map<std::string, std::map<uintptr_t, std::string>> tables;
  static std::unordered_map<const void*, std::string> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto c = cache.find(addr);
  if (c != cache.end()) return c->second;
  std::string name;
  Dl_info info{};
  struct link_map* lm = nullptr;
  if (dladdr1(addr, &info, reinterpret_cast<void**>(&lm), RTLD_DL_LINKMAP) && info.dli_fname && lm) {
    auto t = tables.find(info.dli_fname);
    if (t == tables.end()) t = tables.emplace(info.dli_fname, read_function_symbols(info.dli_fname)).first;
    auto s = t->second.find(reinterpret_cast<uintptr_t>(addr) - lm->l_addr);
    if (s != t->second.end()) name = short_kernel_name(demangle(s->second.c_str()));
  }
  if (name.empty()) {
    std::ostringstream os;
    os << "kernel@" << addr;
    name = os.str();
  }
  cache.emplace(addr, name);
  return name;
}

// ========================================================================================= fibers
#if defined(__x86_64__)
// Minimal context switch (System V x86-64): saves the callee-saved registers and the FP control
// words on the current stack, stores the stack pointer in *from, loads `to` and returns into the
// other context.  No signal-mask system call, unlike swapcontext: a warp collective costs 32 of
// these, so this is most of the emulator's speed.
extern "C" void fusedrnn_emu_switch(void** from, void* to);
extern "C" void fusedrnn_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl fusedrnn_emu_switch
  .hidden fusedrnn_emu_switch
  .type fusedrnn_emu_switch, @function
fusedrnn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fusedrnn_emu_switch, .-fusedrnn_emu_switch

  .p2align 4
  .globl fusedrnn_emu_trampoline
  .hidden fusedrnn_emu_trampoline
  .type fusedrnn_emu_trampoline, @function
fusedrnn_emu_trampoline:
  callq *%r13
  ud2
  .size fusedrnn_emu_trampoline, .-fusedrnn_emu_trampoline
)");

struct Context {
  void* sp = nullptr;
};
void ctx_switch(Context* from, Context* to) { fusedrnn_emu_switch(&from->sp, to->sp); }
void ctx_init(Context* c, unsigned char* stack, size_t size, void (*fn)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 72);  // so that fn starts with rsp % 16 == 8
  sp[0] = 0x037f;                                       // x87 control word (fnstcw slot)
  sp[1] = 0x1f80;                                       // MXCSR
  sp[2] = 0;                                            // r15
  sp[3] = 0;                                            // r14
  sp[4] = reinterpret_cast<uint64_t>(fn);               // r13: called by the trampoline
  sp[5] = 0;                                            // r12
  sp[6] = 0;                                            // rbx
  sp[7] = 0;                                            // rbp
  sp[8] = reinterpret_cast<uint64_t>(&fusedrnn_emu_trampoline);  // return address
  c->sp = sp;
}
#else
// Portable fallback (slower: swapcontext saves the signal mask with a system call).
struct Context {
  ucontext_t uc;
};
void ctx_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
void ctx_init(Context* c, unsigned char* stack, size_t size, void (*fn)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, fn, 0);
}
#endif

// Fiber stacks: mmap'ed with an inaccessible page below (an overflow faults instead of corrupting
// a neighbour), pooled across launches.
struct Stack {
  unsigned char* base = nullptr;  // mapping (guard page first)
  size_t len = 0;
};
std::vector<Stack> g_stack_pool;
std::vector<std::pair<uintptr_t, uintptr_t>> g_stack_guards;  // sorted [lo, hi) of guard pages

void drop_stack(const Stack& s) {
  const auto lo = reinterpret_cast<uintptr_t>(s.base);
  auto it = std::lower_bound(g_stack_guards.begin(), g_stack_guards.end(), std::make_pair(lo, uintptr_t(0)));
  if (it != g_stack_guards.end() && it->first == lo) g_stack_guards.erase(it);
  munmap(s.base, s.len);
}

Stack get_stack(size_t bytes) {
  const size_t ps = page_size();
  const size_t len = (bytes + ps - 1) / ps * ps + ps;
  while (!g_stack_pool.empty()) {
    Stack s = g_stack_pool.back();
    g_stack_pool.pop_back();
    if (s.len == len) return s;
    drop_stack(s);
  }
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(m != MAP_FAILED, "fusedrnn CUDA emulation: cannot map a fiber stack");
  mprotect(m, ps, PROT_NONE);
  Stack s{static_cast<unsigned char*>(m), len};
  const auto lo = reinterpret_cast<uintptr_t>(m);
  g_stack_guards.insert(std::upper_bound(g_stack_guards.begin(), g_stack_guards.end(), std::make_pair(lo, lo + ps)),
                        std::make_pair(lo, lo + ps));
  return s;
}


enum class FiberState : uint8_t { kRunnable, kBarrier, kWarp, kSpin, kExited };

struct Fiber {
  Context ctx;
  Stack stack;
  FiberState st = FiberState::kRunnable;
  bool started = false;
  bool polled = false;
  unsigned last_poll = 0;
  // This thread's recent ld.relaxed loads (ld_relaxed_gpu): address, the suspension count when it
  // was loaded (the same count again means polling) and the bytes it read (a change is progress).
  struct Poll {
    uintptr_t addr = 0;
    uint64_t seq = 0;
    unsigned char val[16];
  };
  Poll polls[16];
  int npolls = 0, next_poll = 0;
  uint64_t seq = 0;  // suspensions so far
  ThreadState ts;
};

// Guard ranges of the buffers a launch may touch (the op's buffers, the blocks' shared memory),
// sorted, for the fault handler (which must not allocate: read only while a launch runs).
struct GuardRange {
  uintptr_t lo, hi;
  Buffer* buf;
};
std::vector<GuardRange> g_guard_ranges;

void add_guards(Buffer* b) {
  for (const GuardRange& r : {GuardRange{b->map_base, b->begin, b}, GuardRange{b->data + b->size, b->map_base + b->map_len, b}}) {
    auto it = std::upper_bound(g_guard_ranges.begin(), g_guard_ranges.end(), r.lo,
                               [](uintptr_t v, const GuardRange& x) { return v < x.lo; });
    g_guard_ranges.insert(it, r);
  }
}
void remove_guards(Buffer* b) {
  g_guard_ranges.erase(std::remove_if(g_guard_ranges.begin(), g_guard_ranges.end(),
                                      [b](const GuardRange& r) { return r.buf == b; }),
                       g_guard_ranges.end());
}

// ===================================================================================== launches
struct WarpOp {
  int kind = 0;  // 1 shfl, 2 mma, 3 syncwarp (kWarpOpNames)
  MmaKind mma = MmaKind::kBf16;
  unsigned mask = 0;
  int src = 0;
  unsigned bytes = 0;
  void* value = nullptr;
  float* d = nullptr;
  uint32_t a[4] = {0, 0, 0, 0};
  uint32_t b0 = 0, b1 = 0;
};
const char* const kWarpOpNames[] = {"?", "shfl_sync", "mma.sync", "__syncwarp"};
struct Warp {
  int arrived = 0;
  int first = -1;
  WarpOp ops[32];
};

struct Block {
  unsigned bid = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Fiber*> queue;
  size_t qhead = 0;
  int exited = 0;
  bool done = false;
  std::shared_ptr<Buffer> smem;
  std::vector<uint32_t> vc;  // vector clock over the blocks of the launch (race checker)
};

// A buffer the race checker watches during one launch.
struct Watched {
  std::shared_ptr<Buffer> buf;
  uintptr_t begin = 0, end = 0;  // accessible bytes before the data included (underruns)
  std::vector<unsigned char> snap;
  std::vector<uint64_t> writer;   // per 2-byte granule: (block + 1) << 32 | epoch, 0 = not written
  std::vector<uint32_t> readers;  // per granule x block: epoch of the block's last ld_cg read
  std::vector<uint8_t> strong;    // per granule: its last write was a st.relaxed (not a plain store)
  bool underrun_reported = false;
};

// Something a launch found; formatted by the op scope (labels are known when the op returns).
struct Problem {
  std::string head;                // "out-of-bounds write in kernel K: block 2, thread 17"
  std::shared_ptr<Buffer> buf;     // where, if a buffer
  int64_t offset = 0;              // byte offset from the buffer's data start
  std::string tail;
};

struct LaunchState {
  const KernelLaunch* desc = nullptr;
  std::string kernel;
  std::string where;  // "kernel K (launch n of op X)"
  unsigned nblocks = 0;
  std::vector<std::unique_ptr<Block>> blocks;
  bool abort = false;
  bool progress = false;
  std::mt19937_64 rng;
  bool race_check = true;
  std::vector<Watched> watched;  // sorted by begin
  std::map<uintptr_t, std::vector<uint32_t>> release_clock;  // per atomic location
  std::set<std::tuple<int, int, unsigned, unsigned>> reported;  // (kind, buffer, block, other)
  std::vector<std::shared_ptr<Buffer>> finished_smem;
  int suppressed = 0;
};

LaunchState* g_launch = nullptr;
Fiber* g_cur = nullptr;
Context g_sched;

struct ScopeState {
  std::string op;
  std::vector<std::shared_ptr<Buffer>> buffers;  // every buffer allocated in the scope
  std::vector<Problem> problems;
  int launches = 0;
};

void scope_keep(const std::shared_ptr<Buffer>& b) {
  if (g_scope) g_scope->buffers.push_back(b);
}

void add_problem(Problem p) {
  if (g_scope && g_scope->problems.size() < 64) g_scope->problems.push_back(std::move(p));
}

std::string thread_str(const ThreadState& t) {
  std::ostringstream os;
  os << "block " << t.bid << ", thread " << t.tid << " (warp " << (t.tid >> 5) << ", lane " << (t.tid & 31) << ")";
  return os.str();
}

// An error inside the kernel that ends the launch (deadlock, contract violation).
void fatal(const std::string& what) {
  Problem p;
  p.head = what + " in " + g_launch->where;
  add_problem(std::move(p));
  g_launch->abort = true;
}

// ------------------------------------------------------------------------------- race checker
Watched* find_watched(uintptr_t p) {
  auto& w = g_launch->watched;
  auto it = std::upper_bound(w.begin(), w.end(), p, [](uintptr_t v, const Watched& x) { return v < x.begin; });
  if (it == w.begin()) return nullptr;
  --it;
  return p < it->end ? &*it : nullptr;
}

void race(int kind, Watched& w, size_t granule, unsigned block, unsigned other, uint32_t epoch, uint32_t seen) {
  LaunchState& L = *g_launch;
  if (!L.reported.emplace(kind, w.buf->id, block, other).second) {
    ++L.suppressed;
    return;
  }
  static const char* what[] = {
      "race: a cross-block ld.global.cg read of data another block wrote in the same barrier phase",
      "race: conflicting writes by two blocks in the same barrier phase",
      "race: a write to data another block reads (ld.global.cg) in the same barrier phase",
      "race: a cross-block ld.relaxed read of data another block wrote with a plain (weak) store in the same "
      "barrier phase",
  };
  Problem p;
  std::ostringstream head, tail;
  head << what[kind] << ", in " << L.where << ": block " << block;
  head << (kind == 0 || kind == 3 ? " read " : " wrote ");
  p.head = head.str();
  p.buf = w.buf;
  p.offset = static_cast<int64_t>(w.begin + granule * 2) - static_cast<int64_t>(w.buf->data);
  tail << (kind == 2 ? "; block " : ", which block ") << other << (kind == 2 ? " read it" : " wrote")
       << " in its barrier phase " << epoch - 1 << ", and block " << block << " had synchronised (release/acquire)"
       << " only with its phases before " << seen;
  p.tail = tail.str();
  add_problem(std::move(p));
}

uint64_t writer_word(unsigned block, uint32_t epoch) { return (uint64_t(block) + 1) << 32 | epoch; }

// Block b wrote 2-byte granule g of w (found by the diff; strong: by st.relaxed).
void on_write(Watched& w, size_t g, unsigned b, bool strong = false) {
  LaunchState& L = *g_launch;
  const uintptr_t addr = w.begin + g * 2;
  if (addr < w.buf->data) {
    if (!w.underrun_reported) {
      w.underrun_reported = true;
      Problem p;
      p.head = "out-of-bounds write before the start of a buffer in " + L.where + ": block " + std::to_string(b) +
               " wrote";
      p.buf = w.buf;
      p.offset = static_cast<int64_t>(addr) - static_cast<int64_t>(w.buf->data);
      add_problem(std::move(p));
    }
    return;
  }
  if (!L.race_check) return;
  const std::vector<uint32_t>& vc = L.blocks[b]->vc;
  if (w.writer.empty()) w.writer.assign((w.end - w.begin + 1) / 2, 0);
  const uint64_t prev = w.writer[g];
  if (prev != 0) {
    const unsigned pb = static_cast<unsigned>(prev >> 32) - 1;
    const uint32_t pe = static_cast<uint32_t>(prev);
    if (pb != b && pe > vc[pb]) race(1, w, g, b, pb, pe, vc[pb]);
  }
  if (!w.readers.empty()) {
    const uint32_t* r = &w.readers[g * L.nblocks];
    for (unsigned o = 0; o < L.nblocks; ++o) {
      if (o != b && r[o] > vc[o]) race(2, w, g, b, o, r[o], vc[o]);
    }
  }
  w.writer[g] = writer_word(b, vc[b]);
  if (strong || !w.strong.empty()) {
    if (w.strong.empty()) w.strong.assign(w.writer.size(), 0);
    w.strong[g] = strong ? 1 : 0;
  }
}

// Every write block b made since its last flush: diff against the snapshot.  Returns whether it
// wrote anything (progress, for the deadlock detection of polling loops).
bool flush(Block& blk) {
  bool wrote = false;
  for (Watched& w : g_launch->watched) {
    const size_t n = w.end - w.begin;
    const unsigned char* cur = reinterpret_cast<const unsigned char*>(w.begin);
    unsigned char* snap = w.snap.data();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t x, y;
      std::memcpy(&x, cur + i, 8);
      std::memcpy(&y, snap + i, 8);
      if (x == y) continue;
      wrote = true;
      for (size_t k = 0; k < 8; k += 2) {
        if (cur[i + k] != snap[i + k] || cur[i + k + 1] != snap[i + k + 1]) on_write(w, (i + k) / 2, blk.bid);
      }
      std::memcpy(snap + i, cur + i, 8);
    }
    for (; i < n; ++i) {
      if (cur[i] != snap[i]) {
        wrote = true;
        on_write(w, i / 2, blk.bid);
        snap[i] = cur[i];
      }
    }
  }
  return wrote;
}

// ----------------------------------------------------------------------------- fiber switching
Fiber* pop_runnable(Block* b) {
  if (b->qhead < b->queue.size()) return b->queue[b->qhead++];
  b->queue.clear();
  b->qhead = 0;
  return nullptr;
}

void fiber_main();

void start_if_fresh(Fiber* f) {
  if (f->started) return;
  f->started = true;
  f->stack = get_stack(options_unlocked().stack_bytes);
  const size_t ps = page_size();
  ctx_init(&f->ctx, f->stack.base + ps, f->stack.len - ps, &fiber_main);
}

void enter(Fiber* f) {
  g_cur = f;
  g_thread = &f->ts;
}

// The running fiber stops (its state already set): the next runnable fiber of its block runs, or
// control returns to the scheduler.  Returns when this fiber is resumed.
void suspend() {
  Fiber* me = g_cur;
  me->seq++;  // the next load of any address is a fresh one
  Fiber* next = g_launch->abort ? nullptr : pop_runnable(me->ts.block);
  if (next) {
    start_if_fresh(next);
    enter(next);
    ctx_switch(&me->ctx, &next->ctx);
  } else {
    ctx_switch(&me->ctx, &g_sched);
  }
  enter(me);
}

void fiber_main() {
  Fiber* me = g_cur;
  try {
    g_launch->desc->invoke(g_launch->desc->kernel, g_launch->desc->args);
  } catch (const std::exception& e) {
    fatal(std::string("exception thrown inside the kernel (") + e.what() + ")");
  } catch (...) {
    fatal("exception thrown inside the kernel");
  }
  me->st = FiberState::kExited;
  me->ts.block->exited++;
  g_launch->progress = true;
  // Exited lanes can never join a warp collective their warp is waiting in.
  Warp& w = me->ts.block->warps[me->ts.tid >> 5];
  if (w.arrived > 0 && !g_launch->abort) {
    fatal("warp collective (" + std::string(kWarpOpNames[w.ops[w.first].kind]) +
          ") that an exited lane never reaches: " + thread_str(me->ts) + " returned");
  }
  suspend();
  std::abort();  // an exited fiber is never resumed
}

void queue_fibers(Block& b, FiberState from) {
  std::vector<Fiber*> fs;
  for (Fiber& f : b.fibers) {
    if (f.st == from) {
      f.st = FiberState::kRunnable;
      fs.push_back(&f);
    }
  }
  const std::string& order = options_unlocked().thread_order;
  if (order == "reverse") std::reverse(fs.begin(), fs.end());
  else if (order != "forward") std::shuffle(fs.begin(), fs.end(), g_launch->rng);
  b.queue.insert(b.queue.end(), fs.begin(), fs.end());
}

// --------------------------------------------------------------------------------- the scheduler
void make_block(LaunchState& L, unsigned bid) {
  auto b = std::make_unique<Block>();
  b->bid = bid;
  const unsigned nt = L.desc->threads;
  b->fibers.resize(nt);
  b->warps.resize((nt + 31) / 32);
  if (L.desc->smem > 0) {
    b->smem = map_buffer(L.desc->smem, 16);
    b->smem->op_buffer = false;
    b->smem->label = "the dynamic shared memory of block " + std::to_string(bid) + " (" +
                     std::to_string(L.desc->smem) + " bytes)";
    add_guards(b->smem.get());
  }
  for (unsigned t = 0; t < nt; ++t) {
    Fiber& f = b->fibers[t];
    f.ts.tid = t;
    f.ts.bid = bid;
    f.ts.block = b.get();
    f.ts.smem = b->smem ? reinterpret_cast<unsigned char*>(b->smem->data) : nullptr;
  }
  b->vc.assign(L.nblocks, 0);
  b->vc[bid] = 1;
  queue_fibers(*b, FiberState::kRunnable);
  L.blocks[bid] = std::move(b);
}

void release_block(Block& b) {
  for (Fiber& f : b.fibers) {
    if (f.started) g_stack_pool.push_back(f.stack);
    f.started = false;
  }
  if (b.smem && b.smem->map_base) {
    remove_guards(b.smem.get());
    unmap_buffer(*b.smem);
    b.smem->map_base = 0;
  }
  b.fibers.clear();
  b.fibers.shrink_to_fit();
}

std::string block_states(const Block& b) {
  int n[5] = {0, 0, 0, 0, 0};
  for (const Fiber& f : b.fibers) n[static_cast<int>(f.st)]++;
  std::ostringstream os;
  os << "block " << b.bid << ": " << n[1] << " threads at __syncthreads, " << n[2] << " in a warp collective, "
     << n[3] + n[0] << " polling (ld.acquire / ld.relaxed), " << n[4] << " exited";  // (pollers are requeued)
  for (size_t w = 0; w < b.warps.size(); ++w) {
    if (b.warps[w].arrived > 0) {
      os << "; warp " << w << " has " << b.warps[w].arrived << " lanes in "
         << kWarpOpNames[b.warps[w].ops[b.warps[w].first].kind];
    }
  }
  return os.str();
}

// Runs one slice of block b; returns false when the block is done.
void run_slice(Block& b) {
  Fiber* f = pop_runnable(&b);
  if (f) {
    start_if_fresh(f);
    enter(f);
    ctx_switch(&g_sched, &f->ctx);
    g_thread = nullptr;
    g_cur = nullptr;
  }
  if (g_launch->abort) return;
  if (flush(b)) g_launch->progress = true;
  const unsigned n = static_cast<unsigned>(b.fibers.size());
  int barrier = 0, spin = 0;
  for (const Fiber& x : b.fibers) {
    barrier += x.st == FiberState::kBarrier;
    spin += x.st == FiberState::kSpin;
  }
  if (b.exited == static_cast<int>(n)) {
    b.done = true;
    g_launch->progress = true;
  } else if (spin > 0) {
    queue_fibers(b, FiberState::kSpin);
  } else if (barrier + b.exited == static_cast<int>(n)) {
    queue_fibers(b, FiberState::kBarrier);
    g_launch->progress = true;
  } else {
    fatal("deadlock inside a block (" + block_states(b) + ")");
  }
}

void run_launch(LaunchState& L) {
  const Options& opt = options_unlocked();
  const auto t0 = std::chrono::steady_clock::now();
  double limit_s = 900;
  if (const char* s = std::getenv("FUSEDRNN_CUDA_EMULATION_TIMEOUT")) limit_s = std::atof(s);
  // Blocks of a cooperative launch are all resident and interleaved; a plain launch runs its
  // blocks one after the other (they cannot wait for each other).
  const unsigned window = L.desc->cooperative ? L.nblocks : 1;
  unsigned next_block = 0;
  std::vector<unsigned> live;
  std::vector<char> stalled(L.nblocks, 0);
  unsigned nstalled = 0, rr = 0;
  uint64_t slices = 0;
  while (!L.abort) {
    while (live.size() < window && next_block < L.nblocks) {
      make_block(L, next_block);
      live.push_back(next_block++);
    }
    if (live.empty()) break;
    size_t pick;
    if (opt.block_order == "round_robin") pick = rr++ % live.size();
    else pick = std::uniform_int_distribution<size_t>(0, live.size() - 1)(L.rng);
    const unsigned bid = live[pick];
    Block& b = *L.blocks[bid];
    L.progress = false;
    run_slice(b);
    if (L.abort) break;
    const bool done = b.done;
    if (done) {
      release_block(b);
      live.erase(live.begin() + static_cast<long>(pick));
      // A plain launch may have many blocks: drop the finished one (its vector clock is O(grid)).
      if (!L.desc->cooperative) {
        if (b.smem) L.finished_smem.push_back(b.smem);  // fault reports may still name it
        L.blocks[bid].reset();
      }
    }
    if (L.progress) {
      if (nstalled) std::fill(stalled.begin(), stalled.end(), 0);
      nstalled = 0;
    } else if (!done && !stalled[bid]) {
      stalled[bid] = 1;
      if (++nstalled == live.size()) {
        std::ostringstream os;
        os << "deadlock: every block waits and none can proceed (a grid barrier some block never reaches?)";
        for (unsigned id : live) os << "; " << block_states(*L.blocks[id]);
        fatal(os.str());
      }
    }
    if ((++slices & 1023) == 0) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s > limit_s) fatal("timeout: the launch ran " + std::to_string(s) + " s (FUSEDRNN_CUDA_EMULATION_TIMEOUT)");
    }
  }
  for (auto& b : L.blocks) {
    if (b) release_block(*b);
  }
}

// =============================================================================== fault handling
struct Fault {
  uintptr_t addr;
  Buffer* buf;
  int write;  // 1 write, 0 read, -1 unknown
  ThreadState ts;
};
std::vector<uintptr_t> g_opened_pages;   // guard pages made accessible after a fault
Fault g_faults[32];
int g_nfaults = 0;
volatile sig_atomic_t g_in_launch = 0;
struct sigaction g_prev_segv;
stack_t g_prev_altstack;
std::vector<unsigned char> g_altstack;

void on_segv(int sig, siginfo_t* si, void* uctx) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(si->si_addr);
  if (g_in_launch) {
    size_t lo = 0, hi = g_guard_ranges.size();
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (g_guard_ranges[mid].hi <= addr) lo = mid + 1;
      else hi = mid;
    }
    if (lo < g_guard_ranges.size() && g_guard_ranges[lo].lo <= addr && addr < g_guard_ranges[lo].hi &&
        g_opened_pages.size() < g_opened_pages.capacity()) {
      if (g_nfaults < 32) {
        Fault& f = g_faults[g_nfaults++];
        f.addr = addr;
        f.buf = g_guard_ranges[lo].buf;
#if defined(__x86_64__)
        f.write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#else
        f.write = -1;
#endif
        f.ts = g_thread ? *g_thread : ThreadState{};
      }
      // Let the access complete on a poisoned page (reads give NaN) and keep running: the
      // launch's results are discarded by the error the op raises.
      const uintptr_t page = addr & ~uintptr_t(page_size() - 1);
      mprotect(reinterpret_cast<void*>(page), page_size(), PROT_READ | PROT_WRITE);
      std::memset(reinterpret_cast<void*>(page), 0xff, page_size());
      g_opened_pages.push_back(page);
      return;
    }
    for (const auto& r : g_stack_guards) {
      if (r.first <= addr && addr < r.second) {
        static const char msg[] =
            "fusedrnn CUDA emulation: a kernel thread overflowed its fiber stack "
            "(raise fusedrnn._C.emulation.set_options(stack_kb=...))\n";
        (void)!write(2, msg, sizeof(msg) - 1);
        std::abort();
      }
    }
  }
  // Not ours: the previous handler gets the fault when the instruction runs again.
  sigaction(sig, &g_prev_segv, nullptr);
}

void install_fault_handler() {
  if (g_altstack.empty()) g_altstack.resize(1 << 16);
  stack_t ss{};
  ss.ss_sp = g_altstack.data();
  ss.ss_size = g_altstack.size();
  sigaltstack(&ss, &g_prev_altstack);
  struct sigaction sa {};
  sa.sa_sigaction = &on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_prev_segv);
  g_in_launch = 1;
}

void remove_fault_handler() {
  g_in_launch = 0;
  sigaction(SIGSEGV, &g_prev_segv, nullptr);
  sigaltstack(&g_prev_altstack, nullptr);
  for (uintptr_t page : g_opened_pages) mprotect(reinterpret_cast<void*>(page), page_size(), PROT_NONE);
  g_opened_pages.clear();
}

// =================================================================================== collectives
void compute_mma(Warp& w) {
  // A 16 x K (row-major), B K x 8, C/D 16 x 8, K = 16 (bf16/f16) or 8 (tf32); fragment ownership
  // per the PTX ISA tables (lane = 4 * groupID + threadID_in_group).
  const MmaKind kind = w.ops[w.first].mma;
  const bool tf32 = kind == MmaKind::kTf32;
  double A[16][16] = {}, Bm[16][8] = {};
  auto half_val = [&](uint32_t reg, int hi) -> double {
    const uint16_t h = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffff);
    return kind == MmaKind::kBf16 ? c10::detail::f32_from_bits(h) : c10::detail::fp16_ieee_to_fp32_value(h);
  };
  auto tf32_val = [](uint32_t reg) -> double {
    reg &= 0xffffe000u;  // the tensor core reads the 19 TF32 bits only
    float f;
    std::memcpy(&f, &reg, 4);
    return f;
  };
  for (int lane = 0; lane < 32; ++lane) {
    const WarpOp& o = w.ops[lane];
    const int g = lane >> 2, q = lane & 3;
    if (!tf32) {
      // A (m16n8k16 .bf16/.f16): a_i, i = 0..7, two per register (low half first);
      //   row = g for i in {0,1,4,5}, else g + 8;  col = 2q + (i & 1) + (i >= 4 ? 8 : 0).
      for (int i = 0; i < 8; ++i) {
        const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
        const int col = 2 * q + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = half_val(o.a[i / 2], i & 1);
      }
      // B: b_i, i = 0..3 (b0 register: b_0, b_1; b1 register: b_2, b_3);
      //   row (k) = 2q + (i & 1) + (i >= 2 ? 8 : 0);  col (n) = g.
      for (int i = 0; i < 4; ++i) {
        const int k = 2 * q + (i & 1) + (i >= 2 ? 8 : 0);
        Bm[k][g] = half_val(i < 2 ? o.b0 : o.b1, i & 1);
      }
    } else {
      // A (m16n8k8 .tf32): a0 (g, q), a1 (g + 8, q), a2 (g, q + 4), a3 (g + 8, q + 4).
      A[g][q] = tf32_val(o.a[0]);
      A[g + 8][q] = tf32_val(o.a[1]);
      A[g][q + 4] = tf32_val(o.a[2]);
      A[g + 8][q + 4] = tf32_val(o.a[3]);
      // B: b0 (k = q, n = g), b1 (k = q + 4, n = g).
      Bm[q][g] = tf32_val(o.b0);
      Bm[q + 4][g] = tf32_val(o.b1);
    }
  }
  const int K = tf32 ? 8 : 16;
  float D[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    // C/D: c_i row = g (i < 2) or g + 8, col = 2q + (i & 1).
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
      double s = 0;  // products are exact in double; one rounding to fp32 at the end
      for (int k = 0; k < K; ++k) s += A[row][k] * Bm[k][col];
      D[row][col] = static_cast<float>(static_cast<double>(w.ops[lane].d[i]) + s);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i) w.ops[lane].d[i] = D[g + (i >= 2 ? 8 : 0)][2 * q + (i & 1)];
  }
}

void compute_shfl(Warp& w, int lanes) {
  unsigned char vals[32][8];
  for (int l = 0; l < lanes; ++l) std::memcpy(vals[l], w.ops[l].value, w.ops[l].bytes);
  for (int l = 0; l < lanes; ++l) {
    const int src = w.ops[l].src & 31;  // srcLane modulo the warp width
    if (src >= lanes) {
      fatal("shfl_sync from lane " + std::to_string(src) + ", which the partial warp does not have");
      return;
    }
    std::memcpy(w.ops[l].value, vals[src], w.ops[l].bytes);
  }
}

// The running lane has filled its slot w.ops[lane]: the last lane to arrive computes the warp's
// result; the others wait.
void arrive(Warp& w, unsigned lane) {
  Fiber* me = g_cur;
  Block* b = me->ts.block;
  const unsigned wi = me->ts.tid >> 5;
  const WarpOp& op = w.ops[lane];
  const int lanes = static_cast<int>(std::min<unsigned>(32, g_block_dim - wi * 32));
  if (op.kind == 2 && lanes != 32) {
    fatal("mma.sync in a partial warp");
    suspend();
  }
  if ((op.kind == 1 || op.kind == 3) && op.mask != (lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1))) {
    fatal(std::string(kWarpOpNames[op.kind]) + " with a mask other than the full warp (not emulated): " +
          thread_str(me->ts));
    suspend();
  }
  if (w.arrived == 0) {
    w.first = static_cast<int>(lane);
  } else {
    const WarpOp& f = w.ops[w.first];
    if (f.kind != op.kind || f.mma != op.mma || f.mask != op.mask || f.bytes != op.bytes) {
      fatal("divergent warp collective: " + thread_str(me->ts) + " and lane " + std::to_string(w.first) +
            " of its warp are in different collectives");
      suspend();
    }
  }
  g_launch->progress = true;
  if (++w.arrived < lanes) {
    me->st = FiberState::kWarp;
    suspend();
    return;
  }
  if (op.kind == 2) compute_mma(w);
  else if (op.kind == 1) compute_shfl(w, lanes);
  w.arrived = 0;
  Fiber* lane0 = &b->fibers[wi * 32];
  for (int l = 0; l < lanes; ++l) {
    if (lane0 + l != me) {
      lane0[l].st = FiberState::kRunnable;
      b->queue.push_back(lane0 + l);
    }
  }
}

// ============================================================================== device-side hooks
void sync_threads() {
  g_cur->st = FiberState::kBarrier;
  g_launch->progress = true;
  suspend();
}

void shfl_sync(unsigned mask, void* value, unsigned bytes, int src_lane) {
  const unsigned tid = g_thread->tid;
  Warp& w = g_cur->ts.block->warps[tid >> 5];
  WarpOp& op = w.ops[tid & 31];
  op.kind = 1;
  op.mask = mask;
  op.value = value;
  op.bytes = bytes;
  op.src = src_lane;
  arrive(w, tid & 31);
}

void mma_sync(MmaKind kind, float* d, const uint32_t a[4], uint32_t b0, uint32_t b1) {
  const unsigned tid = g_thread->tid;
  Warp& w = g_cur->ts.block->warps[tid >> 5];
  WarpOp& op = w.ops[tid & 31];
  op.kind = 2;
  op.mma = kind;
  op.mask = 0;
  op.bytes = 0;
  op.d = d;
  std::memcpy(op.a, a, sizeof(op.a));
  op.b0 = b0;
  op.b1 = b1;
  arrive(w, tid & 31);
}

bool check_align(const void* p, unsigned align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align == 0) return true;
  std::ostringstream os;
  os << "misaligned " << what << " of " << align << "-byte alignment at " << p << ": " << thread_str(*g_thread);
  fatal(os.str());
  suspend();
  return false;
}

void on_ld_cg(const void* p, unsigned bytes, unsigned align) {
  check_align(p, align, "ld.global.cg");
  LaunchState& L = *g_launch;
  Watched* w = find_watched(reinterpret_cast<uintptr_t>(p));
  if (!w) return;  // beyond a buffer: the load itself faults on the guard and is reported
  if (!L.race_check) return;
  const unsigned b = g_thread->bid;
  const std::vector<uint32_t>& vc = L.blocks[b]->vc;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  const uintptr_t hi = std::min<uintptr_t>(lo + bytes, w->end);
  if (w->readers.empty()) w->readers.assign((w->end - w->begin + 1) / 2 * L.nblocks, 0);
  for (uintptr_t a = lo & ~uintptr_t(1); a < hi; a += 2) {
    const size_t g = (a - w->begin) / 2;
    if (!w->writer.empty() && w->writer[g] != 0) {
      const unsigned pb = static_cast<unsigned>(w->writer[g] >> 32) - 1;
      const uint32_t pe = static_cast<uint32_t>(w->writer[g]);
      if (pb != b && pe > vc[pb]) race(0, *w, g, b, pb, pe, vc[pb]);
    }
    w->readers[g * L.nblocks + b] = vc[b];
  }
}

void on_ld_nc(const void* p, unsigned bytes, unsigned align) {
  check_align(p, align, "ld.global.nc");
  Watched* w = find_watched(reinterpret_cast<uintptr_t>(p));
  if (!w || w->writer.empty()) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  const uintptr_t hi = std::min<uintptr_t>(lo + bytes, w->end);
  for (uintptr_t a = lo & ~uintptr_t(1); a < hi; a += 2) {
    if (w->writer[(a - w->begin) / 2] != 0) {
      Problem pr;
      pr.head = "ld.global.nc (read-only path) of data written during the launch, in " + g_launch->where + ": " +
                thread_str(*g_thread) + " read";
      pr.buf = w->buf;
      pr.offset = static_cast<int64_t>(a) - static_cast<int64_t>(w->buf->data);
      if (g_launch->reported.emplace(3, w->buf->id, g_thread->bid, 0).second) add_problem(std::move(pr));
      return;
    }
  }
}

void red_add_release_gpu(unsigned* p, unsigned v) {
  check_align(p, 4, "red.release.gpu");
  LaunchState& L = *g_launch;
  Block& blk = *L.blocks[g_thread->bid];
  flush(blk);  // the writes before the release belong to the epoch it publishes
  *p += v;
  if (Watched* w = find_watched(reinterpret_cast<uintptr_t>(p))) {  // not a plain write
    std::memcpy(w->snap.data() + (reinterpret_cast<uintptr_t>(p) - w->begin), p, 4);
  }
  std::vector<uint32_t>& clock = L.release_clock[reinterpret_cast<uintptr_t>(p)];
  if (clock.empty()) clock.assign(L.nblocks, 0);
  for (unsigned i = 0; i < L.nblocks; ++i) clock[i] = std::max(clock[i], blk.vc[i]);
  blk.vc[blk.bid]++;
  L.progress = true;
}

unsigned ld_acquire_gpu(const unsigned* p) {
  check_align(p, 4, "ld.acquire.gpu");
  // A spin: let the other blocks run first (the slice ends here).
  Fiber* me = g_cur;
  me->st = FiberState::kSpin;
  suspend();
  LaunchState& L = *g_launch;
  const unsigned v = *p;
  if (!me->polled || v != me->last_poll) L.progress = true;
  me->polled = true;
  me->last_poll = v;
  auto it = L.release_clock.find(reinterpret_cast<uintptr_t>(p));
  if (it != L.release_clock.end()) {
    std::vector<uint32_t>& vc = L.blocks[g_thread->bid]->vc;
    for (unsigned i = 0; i < L.nblocks; ++i) vc[i] = std::max(vc[i], it->second[i]);
  }
  return v;
}

void ld_relaxed_gpu(const void* p, void* out, unsigned bytes, unsigned elem) {
  check_align(p, bytes, "ld.relaxed.gpu");
  Fiber* me = g_cur;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  Fiber::Poll* poll = nullptr;
  for (int i = 0; i < me->npolls; ++i) {
    if (me->polls[i].addr == a) poll = &me->polls[i];
  }
  if (poll && poll->seq == me->seq) {  // polling: let the other blocks run first (the slice ends here)
    me->st = FiberState::kSpin;
    suspend();
  }
  LaunchState& L = *g_launch;
  if (L.race_check) {
    if (Watched* w = find_watched(a)) {
      // A strong load of another block's plain store that it has not synchronised with is a data
      // race in the PTX memory model (a strong store, or a synchronised plain one, is fine).
      const unsigned b = g_thread->bid;
      const std::vector<uint32_t>& vc = L.blocks[b]->vc;
      const uintptr_t hi = std::min<uintptr_t>(a + bytes, w->end);
      for (uintptr_t x = a & ~uintptr_t(1); x < hi && !w->writer.empty(); x += 2) {
        const size_t g = (x - w->begin) / 2;
        if (w->writer[g] == 0 || (!w->strong.empty() && w->strong[g])) continue;
        const unsigned pb = static_cast<unsigned>(w->writer[g] >> 32) - 1;
        const uint32_t pe = static_cast<uint32_t>(w->writer[g]);
        if (pb != b && pe > vc[pb]) race(3, *w, g, b, pb, pe, vc[pb]);
      }
    }
  }
  (void)elem;  // each element is read whole: the emulator never tears a word
  std::memcpy(out, p, bytes);
  // A poll that reads something new is progress (for the deadlock detection: the write that
  // changed it may have been the last thing another block did before exiting).
  if (!poll) {
    if (me->npolls < 16) {
      poll = &me->polls[me->npolls++];
    } else {
      poll = &me->polls[me->next_poll];
      me->next_poll = (me->next_poll + 1) % 16;
    }
    poll->addr = a;
    std::memcpy(poll->val, out, bytes);
  } else if (std::memcmp(poll->val, out, bytes) != 0) {
    std::memcpy(poll->val, out, bytes);
    L.progress = true;
  }
  poll->seq = me->seq;
}

void st_relaxed_gpu(void* p, const void* v, unsigned bytes) {
  check_align(p, bytes, "st.relaxed.gpu");
  LaunchState& L = *g_launch;
  const unsigned b = g_thread->bid;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  Watched* w = find_watched(a);
  if (w && a + bytes <= w->end) {
    // The block's plain writes so far are its own (diffed at the slice's end); record this one now
    // as strong and keep it out of the diff.
    for (unsigned k = 0; k < bytes; k += 2) on_write(*w, (a + k - w->begin) / 2, b, true);
    std::memcpy(p, v, bytes);
    std::memcpy(w->snap.data() + (a - w->begin), p, bytes);
  } else {
    std::memcpy(p, v, bytes);  // beyond a buffer: faults on the guard and is reported
  }
  L.progress = true;
}

void sync_warp() {
  const unsigned tid = g_thread->tid;
  Warp& w = g_cur->ts.block->warps[tid >> 5];
  WarpOp& op = w.ops[tid & 31];
  const unsigned wi = tid >> 5;
  const unsigned lanes = std::min<unsigned>(32, g_block_dim - wi * 32);
  op.kind = 3;
  op.mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  op.bytes = 0;
  arrive(w, tid & 31);
}

// ======================================================================================= devices
const DeviceProps& device() {
  std::lock_guard<std::mutex> lock(g_state_mu);
  DeviceProps& d = device_unlocked();
  d.id = config_id(d);
  d.record_name = record_name(d);
  return d;
}

const DeviceProps& set_device(const std::string& name, int sms) {
  std::lock_guard<std::mutex> lock(g_state_mu);
  TORCH_CHECK(sms >= 0, "fusedrnn CUDA emulation: sms must be >= 0, got ", sms);
  DeviceProps p = preset(name);
  if (sms > 0) p.sms = sms;
  DeviceProps& d = device_unlocked();
  d = p;
  d.id = config_id(d);
  d.record_name = record_name(d);
  return d;
}

int co_resident_ctas(int threads, size_t smem) {
  const DeviceProps& p = device();
  if (threads <= 0 || threads > 1024 || smem > p.smem_optin) return 0;
  const int by_smem = static_cast<int>(p.smem_per_sm / (smem + p.smem_reserved));
  const int by_threads = p.max_threads_per_sm / threads;
  const int warps_regs = ((threads + 31) / 32) * 32 * p.max_regs_per_thread;
  const int by_regs = p.regs_per_sm / warps_regs;
  const int per_sm = std::min({by_smem, by_threads, by_regs, p.max_blocks_per_sm});
  return per_sm * p.sms;
}

Options& options() { return options_unlocked(); }

// ====================================================================================== launches
void launch(const KernelLaunch& l) {
  TORCH_CHECK(g_scope != nullptr, "fusedrnn CUDA emulation: a kernel launch outside an emulated op");
  TORCH_CHECK(l.threads >= 1 && l.threads <= 1024 && l.grid >= 1,
              "fusedrnn CUDA emulation: invalid configuration argument (grid ", l.grid, ", block ", l.threads, ")");
  const DeviceProps& dev = device();
  TORCH_CHECK(l.smem <= dev.smem_optin, "fusedrnn CUDA emulation: ", l.smem,
              " B of dynamic shared memory exceed the device's opt-in limit of ", dev.smem_optin, " B");
  const std::string kernel = symbol_name(l.kernel);
  {
    std::lock_guard<std::mutex> lock(g_state_mu);
    g_launch_counts[kernel]++;
    if (g_launch_log.size() >= 4096) g_launch_log.erase(g_launch_log.begin());
    g_launch_log.push_back(LaunchRecord{kernel, l.grid, l.threads, l.smem, l.cooperative});
  }
  LaunchState L;
  L.desc = &l;
  L.kernel = kernel;
  const int index = ++g_scope->launches;
  L.where = "kernel " + kernel + " (launch " + std::to_string(index) + " of op " + g_scope->op + ", grid " +
            std::to_string(l.grid) + " x " + std::to_string(l.threads) + " threads)";
  L.nblocks = l.grid;
  L.blocks.resize(l.grid);
  const Options& opt = options_unlocked();
  L.race_check = opt.race_check;
  L.rng.seed(opt.seed * 1000003u + static_cast<uint64_t>(index));

  // Watch every live buffer of the op; build the guard table for the fault handler.
  g_guard_ranges.clear();
  {
    std::lock_guard<std::mutex> lock(g_buf_mu);
    for (const std::shared_ptr<Buffer>& b : g_scope->buffers) {
      if (b->map_base == 0) continue;  // freed
      Watched w;
      w.buf = b;
      w.begin = b->begin;
      w.end = b->data + b->size;
      w.snap.assign(reinterpret_cast<const unsigned char*>(w.begin), reinterpret_cast<const unsigned char*>(w.end));
      L.watched.push_back(std::move(w));
      add_guards(b.get());
    }
  }
  std::sort(L.watched.begin(), L.watched.end(), [](const Watched& a, const Watched& b) { return a.begin < b.begin; });
  g_launch = &L;
  g_grid_dim = l.grid;
  g_block_dim = l.threads;
  g_nfaults = 0;
  g_opened_pages.clear();
  g_opened_pages.reserve(4096);
  install_fault_handler();
  try {
    run_launch(L);  // (make_block adds each block's shared memory to the guard table)
  } catch (...) {
    remove_fault_handler();
    g_launch = nullptr;
    throw;
  }
  remove_fault_handler();
  g_launch = nullptr;
  g_thread = nullptr;

  for (int i = 0; i < g_nfaults; ++i) {
    const Fault& f = g_faults[i];
    Problem p;
    std::ostringstream head;
    head << "out-of-bounds " << (f.write == 1 ? "write" : f.write == 0 ? "read" : "access") << " in " << L.where
         << ": " << thread_str(f.ts) << (f.write == 1 ? " wrote" : " read");
    p.head = head.str();
    std::shared_ptr<Buffer> owner;
    for (auto& sb : g_scope->buffers) {
      if (sb.get() == f.buf) owner = sb;
    }
    if (!owner) {  // shared memory (not an op buffer): describe it here
      p.head += " " + f.buf->label + " at byte " +
                std::to_string(static_cast<int64_t>(f.addr) - static_cast<int64_t>(f.buf->data));
    }
    p.buf = owner;
    p.offset = static_cast<int64_t>(f.addr) - static_cast<int64_t>(f.buf->data);
    add_problem(std::move(p));
  }
  if (L.suppressed > 0 && g_scope) {
    Problem p;
    p.head = "(" + std::to_string(L.suppressed) + " more races of the same kinds and blocks in " + L.where +
             " not listed)";
    add_problem(std::move(p));
  }
  // Keep the pool of stacks bounded (a full H100 grid has 33792 threads).
  while (g_stack_pool.size() > 4096) {
    drop_stack(g_stack_pool.back());
    g_stack_pool.pop_back();
  }
}

// ====================================================================================== op scope
std::mutex g_op_mu;

std::string describe(const Problem& p) {
  std::ostringstream os;
  os << p.head;
  if (p.buf) {
    const Buffer& b = *p.buf;
    os << " " << (b.label.empty() ? "an internal buffer of the op (" + std::to_string(b.size) + " bytes: a workspace or a converted copy)" : b.label);
    if (b.elem > 0) {
      const int64_t e = p.offset >= 0 ? p.offset / b.elem : -((-p.offset + b.elem - 1) / b.elem);
      os << " at element " << e << " (it has " << b.size / b.elem << ")";
    } else {
      os << " at byte " << p.offset << " (it has " << b.size << ")";
    }
  }
  os << p.tail;
  return os.str();
}

OpScope::OpScope(const char* op) : op_(op), prev_allocator_(nullptr) {
  g_op_mu.lock();
  TORCH_CHECK(g_scope == nullptr, "fusedrnn CUDA emulation: nested emulated ops");
  g_scope = new ScopeState();
  g_scope->op = op;
  prev_allocator_ = c10::GetCPUAllocator();
  // Priority 255: whatever allocator is installed, ours replaces it for the op (and is put back).
  c10::SetCPUAllocator(&g_tracking, 255);
  if (c10::GetCPUAllocator() != &g_tracking) {
    delete g_scope;
    g_scope = nullptr;
    g_op_mu.unlock();
    TORCH_CHECK(false, "fusedrnn CUDA emulation: cannot install the guarding CPU allocator");
  }
}

OpScope::~OpScope() {
  c10::SetCPUAllocator(static_cast<c10::Allocator*>(prev_allocator_), 255);
  delete g_scope;
  g_scope = nullptr;
  g_op_mu.unlock();
}

void OpScope::label(const void* data, const std::string& what, int elem_size) {
  for (auto& b : g_scope->buffers) {
    if (reinterpret_cast<const void*>(b->data) == data) {
      b->label = what;
      b->elem = elem_size;
    }
  }
}

void OpScope::check() const {
  if (g_scope->problems.empty()) return;
  std::ostringstream os;
  os << "fusedrnn CUDA emulation: " << g_scope->problems.size() << " problem(s) in op " << op_ << ":";
  for (const Problem& p : g_scope->problems) os << "\n  - " << describe(p);
  TORCH_CHECK(false, os.str());
}

std::vector<std::string> compiled_functions(const std::string& ns) {
  std::vector<std::string> out;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<const void*>(&compiled_functions), &info) || !info.dli_fname) return out;
  const std::string prefix = "void " + ns + "::";
  std::set<std::string> seen;
  for (const auto& kv : read_function_symbols(info.dli_fname)) {
    const std::string d = demangle(kv.second.c_str());
    if (d.compare(0, prefix.size(), prefix) == 0 && seen.insert(short_kernel_name(d)).second) {
      out.push_back(short_kernel_name(d));
    }
  }
  return out;
}

std::vector<std::pair<std::string, long>> kernel_launch_counts() {
  std::lock_guard<std::mutex> lock(g_state_mu);
  return {g_launch_counts.begin(), g_launch_counts.end()};
}

void reset_kernel_launch_counts() {
  std::lock_guard<std::mutex> lock(g_state_mu);
  g_launch_counts.clear();
}

std::vector<LaunchRecord> launch_log() {
  std::lock_guard<std::mutex> lock(g_state_mu);
  return g_launch_log;
}

void clear_launch_log() {
  std::lock_guard<std::mutex> lock(g_state_mu);
  g_launch_log.clear();
}

}  // namespace fusedrnn_emu

#pragma GCC visibility pop
