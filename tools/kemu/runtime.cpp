// kemu runtime: each CUDA thread is a fiber; a block's fibers run round-robin on one OS
// thread, switching only at barriers (block or warp), so a block is deterministic.
// Blocks of a launch are spread over KEMU_THREADS OS threads (default: up to 4 cores).
//
// Warp collectives (shuffles, ldmatrix, mma.sync) deposit each lane's operands in the
// warp's exchange slots, wait for all lanes of the mask, then each lane reads what it
// needs. The slots alternate between two phases, so one barrier per operation suffices:
// a lane can only reuse a phase after every lane has passed the next operation's barrier.
//
// cp.async copies are deferred: the source is read at issue, the destination written
// when cp.async.wait_group lets the group complete (or at thread exit), so reading
// shared memory before waiting sees stale data, as it may on a GPU. Dynamic shared
// memory is filled with 0xff (bf16 NaN) before each block, so reads of never-written
// shared memory show up in the results.
//
// Racecheck (built with KEMU_TSAN by `tools/kemu/build.sh --racecheck`): the kernels are
// instrumented by ThreadSanitizer and every fiber is a TSan fiber. Fibers switch without
// implying any order; only what orders threads on a GPU orders them here: __syncthreads
// (the block), __syncwarp (the warp), the start and end of a block and of a launch. So two
// accesses to one address by different threads, one a write, not both atomic, with none
// of these between them, are reported as a data race, whichever order the fibers ran in.
// Shuffles, ldmatrix and mma exchange registers only; they order no memory (as in the CUDA
// memory model), and a lane's ldmatrix row, cp.async copy and wgmma operands count as that
// lane's own reads and writes.
#include "runtime.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(KEMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void *addr, unsigned long size);  // exported by libtsan,
extern "C" void __tsan_write_range(void *addr, unsigned long size); // not in its header
#endif

namespace kemu {

alignas(1024) thread_local uint8_t dyn_smem[kDynSmemMax];

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

// ------------------------------------------------------------ racecheck hooks
// ThreadSanitizer's fiber and annotation calls (see the top); nothing without KEMU_TSAN.
namespace race {
#if defined(KEMU_TSAN)
void *new_fiber() { return __tsan_create_fiber(0); }
void *this_fiber() { return __tsan_get_current_fiber(); }
// Called right before a context switch; the order between fibers comes from the
// release/acquire pairs below, never from the switch itself.
void switch_to(void *fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
void release(void *sync) { __tsan_release(sync); }
void acquire(void *sync) { __tsan_acquire(sync); }
void read(const void *p, size_t n) { __tsan_read_range(const_cast<void *>(p), n); }
void write(void *p, size_t n) { __tsan_write_range(p, n); }
// Reports name the fiber: kernel, block and thread.
void name(void *fiber, const char *kernel, uint3 b, uint3 t) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s block (%u,%u,%u) thread (%u,%u,%u)", kernel, b.x, b.y,
                  b.z, t.x, t.y, t.z);
    __tsan_set_fiber_name(fiber, buf);
}
#else
void *new_fiber() { return nullptr; }
void *this_fiber() { return nullptr; }
void switch_to(void *) {}
void release(void *) {}
void acquire(void *) {}
void read(const void *, size_t) {}
void write(void *, size_t) {}
void name(void *, const char *, uint3, uint3) {}
#endif
} // namespace race

// ------------------------------------------------------------ context switch
#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE/x87 control words on the current stack,
// stores the stack pointer in *save, and resumes the context whose stack pointer is `to`.
extern "C" void kemu_switch(void **save, void *to);
asm(R"(
    .text
    .globl kemu_switch
    .hidden kemu_switch
    .type kemu_switch, @function
kemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kemu_switch, .-kemu_switch
)");
#endif

// One wgmma.mma_async in flight: this thread's n/2 products (n = 64, 128 or 256 columns)
// as read at issue. da == 0: A came from registers, gathered at issue into `a` (this
// thread's rows g and g + 8 of its warp's 16); else A is in shared memory too. a_mn, b_mn:
// that operand is MN-major (transpose flag 1). !accumulate (scale-d 0): the products
// replace d. held: d's values when this op became the oldest in flight on d (watched),
// when d itself was filled with NaNs (poison): nothing but wgmma may read or write an
// accumulator from issue to wgmma.wait_group.
struct WgOp {
    float *d;
    uint64_t da, db;
    int n;
    bool a_mn, b_mn, accumulate;
    float a[2][16];
    float sum[128];
    bool watched = false;
    float held[128];
};

// A thread's asynchronous operations of one kind (cp.async, wgmma) in commit groups:
// `wait(n, done)` completes the oldest groups, each item by `done`, until at most n are
// in flight.
template <class T> struct Pending {
    std::vector<T> open;
    std::deque<std::vector<T>> groups; // committed, oldest first
    void commit() {
        groups.push_back(std::move(open));
        open.clear();
    }
    template <class F> void wait(size_t n, F done) {
        while (groups.size() > n) {
            for (T &x : groups.front()) done(x);
            groups.pop_front();
        }
    }
    bool empty() const { return open.empty() && groups.empty(); }
    void clear() {
        open.clear();
        groups.clear();
    }
};

struct Copy {
    uint8_t *dst;
    uint8_t bytes[16];
    int n;
};

enum class St { Run, BlockBar, WarpBar, Done };

struct Fiber {
#if defined(__x86_64__)
    void *sp = nullptr;
#else
    ucontext_t ctx;
#endif
    uint8_t *stack = nullptr; // lowest usable byte (a guard page lies below)
    void *tsan = nullptr;     // racecheck: this fiber's TSan context
    uint3 tid{};
    int lane = 0, warp = 0;
    St st = St::Run;
    int index = 0;    // linear thread index in the block
    uint64_t ops = 0; // warp-collective operations done; the exchange phase is ops & 1
    Pending<Copy> copies;
    Pending<WgOp> wgmmas;
    size_t wg_issued = 0; // wgmma operations this thread has issued in the block
    size_t wg_waits = 0;  // wgmma.wait_group instructions this thread has run in the block
    bool wg_fenced = false; // a wgmma.fence since the block's start or the last wait_group
};

struct Warp {
    unsigned exists = 0;  // lanes present in the block
    unsigned done = 0;    // lanes that have exited
    unsigned arrived = 0; // lanes waiting at the warp barrier
    uint64_t ex[2][32][4]; // per phase and lane: 3 payload words, then the operation's tag
    uint32_t res[2][32][4]; // ldmatrix: each lane's registers, gathered at the barrier
    // mma: A·B of the warp's operation `ab_op[phase]`, computed by its first lane to run.
    uint64_t ab_op[2] = {~0ull, ~0ull};
    float ab[2][16][8];
    // Racecheck: __syncwarp rounds so far, and a synchronisation object per round parity
    // (see Worker::bar_sync).
    unsigned sync_round = 0;
    char sync[2] = {0, 0};
};

// One OS thread's executor: its fibers' stacks are kept between blocks and launches.
struct Worker {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    // Per warpgroup, the descriptors of each wgmma its first thread issued: the other
    // 127 must issue the same (wgmma is .sync.aligned over the warpgroup).
    std::vector<std::vector<std::pair<uint64_t, uint64_t>>> wg_log;
    // Per warpgroup, where (the call's return address) and with which N its first thread
    // ran each wgmma.wait_group: the others must run the same instruction (.aligned).
    std::vector<std::vector<std::pair<const void *, int>>> wg_wait_log;
#if defined(__x86_64__)
    void *sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    void *sched_tsan = nullptr; // racecheck: the OS thread's own TSan context
    // Racecheck synchronisation objects (their addresses): the scheduler releases
    // `start` before a block, every thread acquires it; threads release `end` at exit.
    // __syncthreads round r: arriving (or exiting) threads release bar_sync[r % 2] and
    // acquire it when the barrier lets them go. Two, so that a thread already past round
    // r cannot release its later accesses into what a slower thread still acquires for r
    // (round r + 2 needs every thread past r + 1).
    char start_sync = 0, end_sync = 0, bar_sync[2] = {0, 0};
    unsigned bar_round = 0;
    Fiber *cur = nullptr;
    const KernelEntry *k = nullptr;
    void **args = nullptr;
    dim3 grid, block;
    uint3 bid{};
    unsigned smem = 0;
    int n = 0; // threads in the block
    int live = 0, at_bar = 0;
    bool failed = false;
    std::string err;
};

thread_local Worker *W = nullptr;

Worker &worker() {
    if (!W) { // one per OS thread, kept for the thread's life
        W = new Worker();
        W->sched_tsan = race::this_fiber();
    }
    return *W;
}

uint8_t *new_stack() {
    const size_t page = sysconf(_SC_PAGESIZE);
    void *p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::fprintf(stderr, "kemu: cannot map a fiber stack\n");
        std::abort();
    }
    mprotect(p, page, PROT_NONE); // overflow faults instead of corrupting a neighbour
    return static_cast<uint8_t *>(p) + page;
}

// KEMU_ORDER=reverse runs a block's threads from the last to the first between waits.
// Lanes that share data without a barrier (a race on a GPU) see each other's writes in
// one order and miss them in the other, so running the tests both ways exposes them.
int order() {
    static const int dir = [] {
        const char *e = std::getenv("KEMU_ORDER");
        return e && std::strcmp(e, "reverse") == 0 ? -1 : 1;
    }();
    return dir;
}

// Suspends the running fiber (blocked or exited) and resumes the next runnable one in
// round-robin order, or the scheduler when there is none (the block is done, failed or
// deadlocked): one context switch per wait instead of two through the scheduler.
void suspend() {
    Worker &w = *W;
    Fiber *me = w.cur;
    Fiber *next = nullptr;
    if (!w.failed)
        for (int s = 1; s <= w.n && !next; s++) {
            Fiber &f = w.fibers[((me->index + order() * s) % w.n + w.n) % w.n];
            if (f.st == St::Run) next = &f;
        }
    if (next == me) return;
    w.cur = next;
    race::switch_to(next ? next->tsan : w.sched_tsan);
#if defined(__x86_64__)
    kemu_switch(&me->sp, next ? next->sp : w.sched_sp);
#else
    swapcontext(&me->ctx, next ? &next->ctx : &w.sched);
#endif
}

void land(Copy &c) {
    race::write(c.dst, c.n);
    std::memcpy(c.dst, c.bytes, c.n);
}

void release_block_barrier(Worker &w) {
    for (Fiber &f : w.fibers)
        if (f.st == St::BlockBar) f.st = St::Run;
    w.at_bar = 0;
    w.bar_round++;
}

[[noreturn]] void fail(const std::string &why) {
    Worker &w = *W;
    if (!w.failed) {
        const Fiber &f = *w.cur;
        char buf[512];
        std::snprintf(buf, sizeof buf, "%s in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)",
                      why.c_str(), w.k->name, w.bid.x, w.bid.y, w.bid.z, f.tid.x, f.tid.y,
                      f.tid.z);
        w.err = buf;
        w.failed = true;
    }
    race::release(&w.end_sync); // the scheduler reuses what the abandoned block touched
    w.cur->st = St::Done;
    suspend();
    __builtin_unreachable();
}

void thread_exit() {
    Worker &w = *W;
    Fiber &f = *w.cur;
    f.copies.commit(); // copies still in flight land at exit
    f.copies.wait(0, land);
    if (!f.wgmmas.empty())
        fail("a thread exited with wgmma operations in flight (no wgmma.wait_group for them)");
    f.st = St::Done;
    race::release(&w.end_sync);
    race::release(&w.bar_sync[w.bar_round & 1]); // exited threads count as arrived
    w.live--;
    Warp &wp = w.warps[f.warp];
    wp.done |= 1u << f.lane;
    if (wp.arrived)
        fail("a lane exited while other lanes of its warp wait for it at a warp-collective "
             "operation");
    if (w.at_bar > 0 && w.at_bar == w.live) release_block_barrier(w);
    suspend();
    __builtin_unreachable();
}

void fiber_main() {
    Worker &w = *W;
    race::acquire(&w.start_sync);
    w.k->call(w.k->fn, w.args);
    thread_exit();
}

#if !defined(__x86_64__)
void fiber_trampoline() { fiber_main(); }
#endif

void start_fiber(Worker &w, Fiber &f) {
#if defined(__x86_64__)
    // Stack image kemu_switch pops: control words, r15..rbp, then fiber_main as the
    // return address; fiber_main starts with rsp = 8 mod 16, as after a call.
    uint8_t *top = f.stack + kStackBytes;
    auto *sp = reinterpret_cast<uint64_t *>(top - 72);
    const uint32_t mxcsr = 0x1f80;
    const uint16_t fpucw = 0x037f;
    std::memcpy(sp, &mxcsr, 4);
    std::memcpy(reinterpret_cast<uint8_t *>(sp) + 4, &fpucw, 2);
    for (int i = 1; i <= 6; i++) sp[i] = 0;
    sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &w.sched;
    makecontext(&f.ctx, fiber_trampoline, 0);
#endif
    (void)w;
}

void run_block(Worker &w, uint3 bid) {
    const int n = int(w.block.x * w.block.y * w.block.z);
    const int n_warps = (n + 31) / 32;
    w.bid = bid;
    w.live = n;
    w.at_bar = 0;
    while (int(w.fibers.size()) < n) {
        w.fibers.emplace_back();
        w.fibers.back().stack = new_stack();
        w.fibers.back().tsan = race::new_fiber();
    }
    w.warps.assign(n_warps, Warp{});
    w.wg_log.assign((n + 127) / 128, {});
    w.wg_wait_log.assign((n + 127) / 128, {});
    for (int i = 0; i < n; i++) {
        Fiber &f = w.fibers[i];
        f.tid = {unsigned(i % w.block.x), unsigned(i / w.block.x % w.block.y),
                 unsigned(i / (w.block.x * w.block.y))};
        f.index = i;
        f.lane = i % 32;
        f.warp = i / 32;
        f.st = St::Run;
        f.ops = 0;
        f.copies.clear();
        f.wgmmas.clear();
        f.wg_issued = 0;
        f.wg_waits = 0;
        f.wg_fenced = false;
        w.warps[f.warp].exists |= 1u << f.lane;
        race::name(f.tsan, w.k->name, bid, f.tid);
        start_fiber(w, f);
    }
    std::memset(dyn_smem, 0xff, std::min<size_t>(kDynSmemMax, std::max(w.smem, 1024u)));
    // Fibers pass control among themselves; the scheduler gets it back when none can run.
    w.n = n;
    Fiber &first = w.fibers[order() > 0 ? 0 : n - 1];
    w.cur = &first;
    race::release(&w.start_sync);
    race::switch_to(first.tsan);
#if defined(__x86_64__)
    kemu_switch(&w.sched_sp, first.sp);
#else
    swapcontext(&w.sched, &first.ctx);
#endif
    race::acquire(&w.end_sync);
    int done = 0, bar = 0, warp = 0;
    for (int i = 0; i < n; i++) {
        done += w.fibers[i].st == St::Done;
        bar += w.fibers[i].st == St::BlockBar;
        warp += w.fibers[i].st == St::WarpBar;
    }
    if (done < n && !w.failed) {
        char buf[512];
        std::snprintf(buf, sizeof buf,
                      "deadlock in kernel %s, block (%u,%u,%u): %d threads wait at "
                      "__syncthreads, %d at a warp-collective operation, %d exited",
                      w.k->name, bid.x, bid.y, bid.z, bar, warp, done);
        w.err = buf;
        w.failed = true;
    }
}

// A kernel's fault (past the end of an allocation: the guard page; a misaligned vector
// access: -fsanitize=alignment traps) names the kernel, block and thread, then dies as
// the signal would have. Runs on an alternate stack: a fiber's may be what overflowed.
struct sigaction previous[32];

void on_fault(int sig) {
    if (!(W && W->cur && W->k)) { // not in a kernel: whoever handled it before (Rust's
        sigaction(sig, &previous[sig], nullptr); // stack-overflow report) sees it again
        return;
    }
    char buf[512];
    int n;
    if (W && W->cur && W->k)
        n = std::snprintf(buf, sizeof buf,
                          "kemu: %s in kernel %s, block (%u,%u,%u), thread (%u,%u,%u) (an "
                          "access past an allocation, a misaligned vector access, or a "
                          "stack overflow)\n",
                          sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" : "SIGILL",
                          W->k->name, W->bid.x, W->bid.y, W->bid.z, W->cur->tid.x,
                          W->cur->tid.y, W->cur->tid.z);
    else
        n = std::snprintf(buf, sizeof buf, "kemu: signal %d outside a kernel\n", sig);
    if (n > 0) (void)!write(2, buf, std::min<size_t>(n, sizeof buf));
    signal(sig, SIG_DFL);
    raise(sig);
}

// Per OS thread that runs blocks: an alternate signal stack, and the handlers (once).
void prepare_thread() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_fault;
        sa.sa_flags = SA_ONSTACK;
        for (int sig : {SIGSEGV, SIGBUS, SIGILL}) sigaction(sig, &sa, &previous[sig]);
    });
    thread_local bool done = false;
    if (done) return;
    done = true;
    stack_t ss;
    ss.ss_size = 64 * 1024;
    ss.ss_sp = std::malloc(ss.ss_size);
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
}

// ------------------------------------------------------------ the worker pool
struct Pool {
    std::mutex m;
    std::condition_variable cv, done_cv;
    std::vector<std::thread> threads;
    int n_threads = 0;
    uint64_t job = 0; // generation counter
    int busy = 0;
    // The current launch.
    const KernelEntry *k = nullptr;
    void **args = nullptr;
    dim3 grid, block;
    unsigned smem = 0;
    std::atomic<uint64_t> next{0};
    uint64_t n_blocks = 0;
    std::atomic<bool> failed{false};
    std::string err;
    std::mutex err_m;

    // Worker `me` of the pool's threads runs the launch's blocks. Racecheck: block b runs
    // on worker b % threads, so neighbouring blocks always run on different OS threads
    // and TSan sees them unordered (blocks that share a worker are ordered by it, as
    // blocks that reuse an SM's shared memory are).
    void work(int me) {
        prepare_thread();
        Worker &w = worker();
        w.k = k;
        w.args = args;
        w.grid = grid;
        w.block = block;
        w.smem = smem;
        w.failed = false;
        w.err.clear();
        for (uint64_t mine = 0;; mine++) {
            if (failed.load()) break;
#if defined(KEMU_TSAN)
            const uint64_t b = mine * uint64_t(n_threads) + uint64_t(me);
#else
            const uint64_t b = next.fetch_add(1);
            (void)mine, (void)me;
#endif
            if (b >= n_blocks) break;
            const uint3 bid{unsigned(b % grid.x), unsigned(b / grid.x % grid.y),
                            unsigned(b / (uint64_t(grid.x) * grid.y))};
            run_block(w, bid);
            if (w.failed) {
                std::lock_guard<std::mutex> g(err_m);
                if (!failed.exchange(true)) err = w.err;
                break;
            }
        }
    }

    void loop(int me) {
        uint64_t seen = 0;
        for (;;) {
            std::unique_lock<std::mutex> g(m);
            cv.wait(g, [&] { return job != seen; });
            seen = job;
            g.unlock();
            work(me);
            g.lock();
            if (--busy == 0) done_cv.notify_all();
        }
    }
};

Pool *the_pool = nullptr;

Pool &pool() {
    static std::once_flag atfork;
    // A forked child has none of the parent's threads: it starts a pool of its own.
    std::call_once(atfork, [] { pthread_atfork(nullptr, nullptr, [] { the_pool = nullptr; }); });
    if (!the_pool) {
        auto *p = new Pool();
        int n = int(std::min(4u, std::max(1u, std::thread::hardware_concurrency())));
#if defined(KEMU_TSAN)
        n = 4; // racecheck: neighbouring blocks on different threads, whatever the cores
#endif
        if (const char *e = std::getenv("KEMU_THREADS")) n = std::max(1, std::atoi(e));
        p->n_threads = n;
        for (int i = 0; i < n; i++) {
            p->threads.emplace_back([p, i] { p->loop(i); });
            p->threads.back().detach();
        }
        the_pool = p;
    }
    return *the_pool;
}

std::mutex launch_m; // one launch at a time (one stream)

} // namespace

bool launch(const KernelEntry &k, dim3 grid, dim3 block, unsigned smem_bytes, void **args,
            std::string &err) {
    std::lock_guard<std::mutex> one(launch_m);
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > kMaxThreads || threads > uint64_t(k.max_threads)) {
        err = "block of " + std::to_string(threads) + " threads for kernel " + k.name +
              " (__launch_bounds__ " + std::to_string(k.max_threads) + ")";
        return false;
    }
    if (smem_bytes > unsigned(kDynSmemMax)) {
        err = "dynamic shared memory " + std::to_string(smem_bytes) + " bytes for kernel " +
              k.name;
        return false;
    }
    Pool &p = pool();
    {
        std::lock_guard<std::mutex> g(p.m);
        p.k = &k;
        p.args = args;
        p.grid = grid;
        p.block = block;
        p.smem = smem_bytes;
        p.next = 0;
        p.n_blocks = uint64_t(grid.x) * grid.y * grid.z;
        p.failed = false;
        p.err.clear();
        p.busy = int(p.threads.size());
        p.job++;
    }
    p.cv.notify_all();
    // Blocks run on the pool's threads only: their fiber stacks and shared memory are
    // kept for the process, where a calling thread's would leak with it.
    {
        std::unique_lock<std::mutex> g(p.m);
        p.done_cv.wait(g, [&] { return p.busy == 0; });
    }
    if (p.failed) {
        err = p.err;
        return false;
    }
    return true;
}

// ------------------------------------------------------------ what kernels call
const uint3 &thread_idx() { return W->cur->tid; }
const uint3 &block_idx() { return W->bid; }
const dim3 &block_dim() { return W->block; }
const dim3 &grid_dim() { return W->grid; }
uint32_t dynamic_smem_bytes() { return W->smem; }

void trap(const char *why) { fail(why); }

void syncthreads() {
    Worker &w = *W;
    char *sync = &w.bar_sync[w.bar_round & 1];
    race::release(sync);
    w.at_bar++;
    if (w.at_bar == w.live) {
        release_block_barrier(w);
    } else {
        w.cur->st = St::BlockBar;
        suspend();
    }
    race::acquire(sync);
}

namespace {

// Waits until every lane of the warp has arrived; the last one checks that all met at
// the same kind of operation (`tag`, 0 for __syncwarp), runs `on_release` for the whole
// warp, then releases them. Only whole-warp masks are emulated (all the kernels use):
// a partial mask would let the lanes' exchange phases drift apart.
void warp_barrier(unsigned mask, uint64_t tag = 0, void (*on_release)(Warp &, int) = nullptr) {
    Worker &w = *W;
    Fiber &f = *w.cur;
    Warp &wp = w.warps[f.warp];
    if (mask != 0xffffffffu)
        fail("kemu emulates warp-collective operations with the full mask 0xffffffff only");
    const unsigned need = wp.exists;
    if (need & wp.done)
        fail("a warp-collective operation waits for a lane that has exited");
    const int ph = int(f.ops & 1);
    if (tag) wp.ex[ph][f.lane][3] = tag;
    char *sync = &wp.sync[wp.sync_round & 1]; // __syncwarp orders the warp's accesses
    if (!tag) race::release(sync);
    wp.arrived |= 1u << f.lane;
    if ((wp.arrived & need) == need) {
        const int base = f.warp * 32;
        if (tag)
            for (int l = 0; l < 32; l++)
                if ((need >> l & 1) && wp.ex[ph][l][3] != tag)
                    fail("the lanes of a warp met at different warp-collective operations");
        if (on_release) on_release(wp, ph);
        for (int l = 0; l < 32; l++)
            if ((need >> l & 1) && l != f.lane) w.fibers[base + l].st = St::Run;
        wp.arrived &= ~need;
        if (!tag) wp.sync_round++;
    } else {
        f.st = St::WarpBar;
        suspend();
    }
    if (!tag) race::acquire(sync);
}

// This lane's exchange slots for its next collective operation.
uint64_t *slots(int lane) {
    Worker &w = *W;
    Fiber &f = *w.cur;
    return w.warps[f.warp].ex[f.ops & 1][lane];
}

void next_phase() { W->cur->ops++; }

float lo_bf16(uint32_t r) { return __bfloat162float({uint16_t(r & 0xffff)}); }
float hi_bf16(uint32_t r) { return __bfloat162float({uint16_t(r >> 16)}); }

} // namespace

void syncwarp(unsigned mask) { warp_barrier(mask); }

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width) {
    Fiber &f = *W->cur;
    slots(f.lane)[0] = bits;
    warp_barrier(mask, 1 | uint64_t(lane_mask) << 8 | uint64_t(width) << 16);
    // Within segments of `width` lanes (PTX shfl.bfly: a source outside the segment or
    // the mask leaves the value unchanged).
    const int seg = f.lane & ~(width - 1);
    const int src = f.lane ^ lane_mask;
    uint64_t r = bits;
    if (src >= seg && src < seg + width && (mask >> src & 1)) r = slots(src)[0];
    next_phase();
    return r;
}

namespace {
// ldmatrix for the whole warp at once, as the hardware reads it: every lane's registers
// from the row addresses the lanes gave (payload word 0); count and trans from the tag.
uint64_t ldmatrix_tag(int count, bool trans) {
    return 2 | uint64_t(count) << 8 | uint64_t(trans) << 12;
}
void ldmatrix_gather(Warp &wp, int ph) {
    const uint64_t tag = wp.ex[ph][0][3];
    const int count = int(tag >> 8 & 7);
    const bool trans = tag >> 12 & 1;
    auto row = [&](int lane) { return reinterpret_cast<const uint8_t *>(wp.ex[ph][lane][0]); };
    for (int l = 0; l < 32; l++)
        for (int i = 0; i < count; i++) {
            if (!trans) {
                // (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i
                std::memcpy(&wp.res[ph][l][i], row(8 * i + l / 4) + 4 * (l % 4), 4);
            } else {
                // (rows 2(l%4), 2(l%4)+1; col l/4) of matrix i
                uint16_t a, b;
                std::memcpy(&a, row(8 * i + 2 * (l % 4)) + 2 * (l / 4), 2);
                std::memcpy(&b, row(8 * i + 2 * (l % 4) + 1) + 2 * (l / 4), 2);
                wp.res[ph][l][i] = uint32_t(a) | uint32_t(b) << 16;
            }
        }
}
} // namespace

void ldmatrix(uint32_t *r, int count, bool trans, const void *row_addr) {
    Worker &w = *W;
    Fiber &f = *w.cur;
    if (f.lane < 8 * count && (reinterpret_cast<uintptr_t>(row_addr) & 15))
        fail("ldmatrix row address not 16-byte aligned");
    if (f.lane < 8 * count) race::read(row_addr, 16);
    slots(f.lane)[0] = reinterpret_cast<uint64_t>(row_addr);
    warp_barrier(0xffffffffu, ldmatrix_tag(count, trans), ldmatrix_gather);
    const int ph = int(f.ops & 1);
    for (int i = 0; i < count; i++) r[i] = w.warps[f.warp].res[ph][f.lane][i];
    next_phase();
}

// D = A(16x16) · B(16x8) + C, fragments as in common.cuh's mma_bf16 comment. The first
// lane to run after the barrier unpacks the whole warp's A and B and forms A·B once (f32
// sums: products of bf16 are exact in f32); each lane adds its C.
void mma_m16n8k16_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    Worker &w = *W;
    Fiber &f = *w.cur;
    uint64_t *s = slots(f.lane);
    s[0] = uint64_t(a[0]) | uint64_t(a[1]) << 32;
    s[1] = uint64_t(a[2]) | uint64_t(a[3]) << 32;
    s[2] = uint64_t(b0) | uint64_t(b1) << 32;
    warp_barrier(0xffffffffu, 3);
    Warp &wp = w.warps[f.warp];
    const int ph = int(f.ops & 1);
    if (wp.ab_op[ph] != f.ops) {
        float A[16][16], B[16][8]; // A[row][k], B[k][col]
        for (int l = 0; l < 32; l++) {
            const int g = l / 4, t = l % 4;
            const uint64_t *o = wp.ex[ph][l];
            const uint32_t r[6] = {uint32_t(o[0]), uint32_t(o[0] >> 32), uint32_t(o[1]),
                                   uint32_t(o[1] >> 32), uint32_t(o[2]), uint32_t(o[2] >> 32)};
            A[g][2 * t] = lo_bf16(r[0]), A[g][2 * t + 1] = hi_bf16(r[0]);
            A[g + 8][2 * t] = lo_bf16(r[1]), A[g + 8][2 * t + 1] = hi_bf16(r[1]);
            A[g][2 * t + 8] = lo_bf16(r[2]), A[g][2 * t + 9] = hi_bf16(r[2]);
            A[g + 8][2 * t + 8] = lo_bf16(r[3]), A[g + 8][2 * t + 9] = hi_bf16(r[3]);
            B[2 * t][g] = lo_bf16(r[4]), B[2 * t + 1][g] = hi_bf16(r[4]);
            B[2 * t + 8][g] = lo_bf16(r[5]), B[2 * t + 9][g] = hi_bf16(r[5]);
        }
        for (int i = 0; i < 16; i++) { // k outer, columns inner: the vectorizer's shape
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int k = 0; k < 16; k++)
                for (int j = 0; j < 8; j++) acc[j] += A[i][k] * B[k][j];
            for (int j = 0; j < 8; j++) wp.ab[ph][i][j] = acc[j];
        }
        wp.ab_op[ph] = f.ops;
    }
    const int g = f.lane / 4, t = f.lane % 4;
    c[0] += wp.ab[ph][g][2 * t];
    c[1] += wp.ab[ph][g][2 * t + 1];
    c[2] += wp.ab[ph][g + 8][2 * t];
    c[3] += wp.ab[ph][g + 8][2 * t + 1];
    next_phase();
}

void cp_async(void *dst, const void *src, int bytes, int src_bytes) {
    Fiber &f = *W->cur;
    if (reinterpret_cast<uintptr_t>(dst) % bytes || (src_bytes && reinterpret_cast<uintptr_t>(src) % bytes))
        fail("cp.async address not aligned to its size");
    Copy c;
    c.dst = static_cast<uint8_t *>(dst);
    c.n = bytes;
    std::memset(c.bytes, 0, sizeof c.bytes);
    if (src_bytes) {
        race::read(src, src_bytes);
        std::memcpy(c.bytes, src, src_bytes);
    }
    race::write(dst, bytes); // the copy may land any time from here to its wait
    f.copies.open.push_back(c);
}

void cp_async_commit() { W->cur->copies.commit(); }

void cp_async_wait(int n) { W->cur->copies.wait(size_t(n), land); }

// ------------------------------------------------------------ sm_90a wgmma
// Dynamic shared memory sits at this address of the shared window, as after 64 bytes of
// static shared memory: kernels that align their tiles by address must do it themselves.
constexpr uint32_t kSharedBase = 0x40;

uint32_t smem_addr(const void *p) {
    const auto *b = static_cast<const uint8_t *>(p);
    if (b < dyn_smem || b > dyn_smem + kDynSmemMax)
        fail("kemu maps only dynamic shared memory to shared-window addresses");
    return kSharedBase + uint32_t(b - dyn_smem);
}

namespace {

// Element (row r = m or n, k < 16) of the operand a matrix descriptor points at (PTX ISA,
// "Matrix Descriptor Format"): start address bits 0-13, leading byte offset bits 16-29,
// stride byte offset bits 32-45, swizzle mode bits 62-63. Only 128-byte swizzling is
// emulated. K-major: row r is 128 bytes (64 k) at (r/8)·SBO + (r%8)·128 from the start.
// MN-major (PTX ISA canonical layout ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))): k is the
// 128-byte row, at (k/8)·SBO + (k%8)·128, holding 64 consecutive r; r/64 moves by LBO.
// Either way the hardware swaps 16-byte chunks by address bits [4:6] ^= [7:9].
float wg_elem(uint64_t desc, int r, int k, bool note, bool mn = false) {
    const uint32_t start = uint32_t(desc & 0x3fff) << 4;
    const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
    const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
    uint32_t a = mn ? start + uint32_t(k / 8) * sbo + uint32_t(k % 8) * 128 +
                          uint32_t(r / 64) * lbo + 2 * uint32_t(r % 64)
                    : start + uint32_t(r / 8) * sbo + uint32_t(r % 8) * 128 + 2 * k;
    a ^= ((a >> 7) & 7) << 4;
    const int64_t off = int64_t(a) - kSharedBase;
    if (off < 0 || off + 2 > int64_t(W->smem))
        fail("a wgmma operand outside the launch's dynamic shared memory");
    uint16_t v;
    if (note) race::read(dyn_smem + off, 2);
    std::memcpy(&v, dyn_smem + off, 2);
    return __bfloat162float({v});
}

void check_desc(uint64_t desc) {
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0)
        fail("kemu emulates only 128-byte-swizzled wgmma operands at base offset 0");
}

// This thread's n/2 accumulator products of D(64 x n) = A(64x16)·B(n x 16)ᵀ: warp q of
// the warpgroup, lane (g, t) holds d[4j+i] at row 16q + g + 8(i/2), column 8j + 2t + i%2
// (PTX ISA, wgmma .m64nNk16 D fragment). A's rows g and g+8 of the warp come from `a`
// (register A, gathered at issue) or, when da != 0, from shared memory.
// `note`: count the operand reads as this thread's (racecheck).
void wg_products(uint64_t da, bool a_mn, const float (*a_regs)[16], uint64_t db, bool b_mn,
                 int n, float *out, bool note) {
    const Fiber &f = *W->cur;
    const int q = (f.index & 127) >> 5, g = f.lane / 4, t = f.lane % 4;
    float a[2][16];
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 16; k++)
            a[h][k] = da ? wg_elem(da, 16 * q + g + 8 * h, k, note, a_mn) : a_regs[h][k];
    for (int j = 0; j < n / 8; j++)
        for (int c = 0; c < 2; c++) {
            float b[16];
            for (int k = 0; k < 16; k++) b[k] = wg_elem(db, 8 * j + 2 * t + c, k, note, b_mn);
            for (int h = 0; h < 2; h++) {
                float acc = 0;
                for (int k = 0; k < 16; k++) acc += a[h][k] * b[k];
                out[4 * j + 2 * h + c] = acc;
            }
        }
}

// Every thread of a warpgroup must issue the same wgmma (.sync.aligned): the first
// thread's operands are logged, the others compared with them.
// PTX ISA (wgmma.fence): one is required before the first wgmma and between any other
// access to a wgmma's accumulator or A registers and that wgmma. kemu cannot see register
// accesses, so it asks for the fence the kernels always give: after the block's start and
// after every wgmma.wait_group (past which the accumulators get read and rescaled), before
// the next wgmma. Without it the hardware may use stale registers.
void wg_check_fenced() {
    if (!W->cur->wg_fenced)
        fail("a wgmma with no wgmma.fence since the block's start or the last wgmma.wait_group");
}

void wg_check_uniform(uint64_t da, uint64_t db) {
    Worker &w = *W;
    Fiber &f = *w.cur;
    if (w.n % 128)
        fail("wgmma in a block that is not a whole number of warpgroups (128 threads)");
    auto &log = w.wg_log[f.index / 128];
    if (log.size() == f.wg_issued)
        log.emplace_back(da, db);
    else if (log[f.wg_issued] != std::make_pair(da, db))
        fail("the threads of a warpgroup issued a wgmma with different operands");
    f.wg_issued++;
}

// While a wgmma is in flight its accumulator registers hold no defined value (PTX ISA:
// accessing them before wgmma.wait_group is undefined): kemu keeps their value aside and
// fills them with a NaN pattern, so an early read computes with NaNs and an early write
// is seen at retire.
constexpr uint32_t kInFlight = 0x7fc0adeeu;
void poison(WgOp &op) {
    op.watched = true;
    std::memcpy(op.held, op.d, sizeof(float) * op.n / 2);
    for (int i = 0; i < op.n / 2; i++) std::memcpy(&op.d[i], &kInFlight, 4);
}
bool still_poisoned(const WgOp &op) {
    for (int i = 0; i < op.n / 2; i++)
        if (std::memcmp(&op.d[i], &kInFlight, 4) != 0) return false;
    return true;
}

// The first op in flight on an accumulator takes its value (poison); the ops behind it on
// the same registers take it from the time the one before them retires (wgmma_wait).
void wg_watch(WgOp &op) {
    Pending<WgOp> &p = W->cur->wgmmas;
    for (const WgOp &o : p.open)
        if (o.d == op.d) return;
    for (const auto &g : p.groups)
        for (const WgOp &o : g)
            if (o.d == op.d) return;
    poison(op);
}

} // namespace

// Deferred like cp.async: the products are formed at issue and added to the registers at
// wgmma.wait_group, after checking that the operands in shared memory did not change in
// between (the hardware reads them at some point in that window).
namespace {
void wgmma_ss(float *d, uint64_t da, uint64_t db, int n, bool accumulate, bool a_mn, bool b_mn) {
    check_desc(da);
    check_desc(db);
    wg_check_fenced();
    wg_check_uniform(da, db);
    WgOp op{d, da, db, n, a_mn, b_mn, accumulate, {}, {}};
    wg_products(da, a_mn, nullptr, db, b_mn, n, op.sum, true);
    wg_watch(op);
    W->cur->wgmmas.open.push_back(op);
}
} // namespace

void wgmma_m64n128k16(float *d, uint64_t da, uint64_t db, bool accumulate) {
    wgmma_ss(d, da, db, 128, accumulate, false, false);
}
void wgmma_m64n64k16(float *d, uint64_t da, uint64_t db, bool accumulate, bool a_mn, bool b_mn) {
    wgmma_ss(d, da, db, 64, accumulate, a_mn, b_mn);
}

namespace {
// Register A: the warp's lanes exchange their fragments (mma.sync's A layout: reg 0 (row
// g, k 2t, 2t+1), reg 1 row g + 8, regs 2/3 the same rows at k + 8), read at issue; the
// registers' later values do not matter here (ptxas keeps them until the wgmma retires).
void wgmma_rs(float *d, const uint32_t a[4], uint64_t db, int n, bool b_mn) {
    check_desc(db);
    wg_check_fenced();
    wg_check_uniform(0, db);
    Worker &w = *W;
    Fiber &f = *w.cur;
    uint64_t *s = slots(f.lane);
    s[0] = uint64_t(a[0]) | uint64_t(a[1]) << 32;
    s[1] = uint64_t(a[2]) | uint64_t(a[3]) << 32;
    warp_barrier(0xffffffffu, 4);
    const int ph = int(f.ops & 1), g = f.lane / 4;
    WgOp op{d, 0, db, n, false, b_mn, true, {}, {}};
    for (int t = 0; t < 4; t++) {
        const uint64_t *o = w.warps[f.warp].ex[ph][4 * g + t];
        const uint32_t r[4] = {uint32_t(o[0]), uint32_t(o[0] >> 32), uint32_t(o[1]),
                               uint32_t(o[1] >> 32)};
        for (int h = 0; h < 2; h++) {
            op.a[h][2 * t] = lo_bf16(r[h]), op.a[h][2 * t + 1] = hi_bf16(r[h]);
            op.a[h][2 * t + 8] = lo_bf16(r[2 + h]), op.a[h][2 * t + 9] = hi_bf16(r[2 + h]);
        }
    }
    next_phase();
    wg_products(0, false, op.a, db, b_mn, n, op.sum, true);
    wg_watch(op);
    f.wgmmas.open.push_back(op);
}
} // namespace

void wgmma_m64n256k16_rs(float *d, const uint32_t a[4], uint64_t db) {
    wgmma_rs(d, a, db, 256, false);
}
void wgmma_m64n64k16_rs_t(float *d, const uint32_t a[4], uint64_t db) {
    wgmma_rs(d, a, db, 64, true);
}

void wgmma_commit() { W->cur->wgmmas.commit(); }
void wgmma_fence() { W->cur->wg_fenced = true; }

// wgmma.wait_group is .sync.aligned: every thread of the warpgroup runs the same
// instruction (PTX ISA). A wait in both arms of a branch that differs between the warps
// of a warpgroup is two instructions; kemu tells them apart by their call sites in the
// kernel's host build (an arm's wait inlined from a shared helper is still its own call).
__attribute__((noinline)) void wgmma_wait(int n) {
    const void *site = __builtin_return_address(0);
    Fiber &f = *W->cur;
    auto &log = W->wg_wait_log[f.index / 128];
    if (log.size() == f.wg_waits)
        log.emplace_back(site, n);
    else if (log[f.wg_waits] != std::make_pair(site, n))
        fail("the threads of a warpgroup ran different wgmma.wait_group instructions "
             "(one in each arm of a branch that is not warpgroup-uniform?)");
    f.wg_waits++;
    f.wg_fenced = false;
    Pending<WgOp> &p = f.wgmmas;
    p.wait(size_t(n), [&p](WgOp &op) {
        float now[128];
        wg_products(op.da, op.a_mn, op.a, op.db, op.b_mn, op.n, now, true); // read from issue to here
        if (std::memcmp(now, op.sum, sizeof(float) * op.n / 2) != 0)
            fail("a wgmma operand in shared memory changed before its wgmma.wait_group");
        if (!op.watched) fail("kemu: a wgmma retired without its accumulator set aside (emulator bug)");
        if (!still_poisoned(op))
            fail("a wgmma's accumulator registers were written before its wgmma.wait_group");
        for (int i = 0; i < op.n / 2; i++) op.d[i] = op.accumulate ? op.held[i] + op.sum[i] : op.sum[i];
        // The next op in flight on these registers is watched from here. The group being
        // retired is still the front of `groups` (popped after every op in it is done).
        auto watch_next = [&](WgOp &o) {
            if (&o == &op || o.d != op.d || o.watched) return false;
            poison(o);
            return true;
        };
        bool past = false; // only ops after `op` in issue order
        for (auto &g : p.groups)
            for (WgOp &o : g) {
                if (&o == &op) {
                    past = true;
                    continue;
                }
                if (past && watch_next(o)) return;
            }
        for (WgOp &o : p.open)
            if (watch_next(o)) return;
    });
}

} // namespace kemu
