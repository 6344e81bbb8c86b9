// kemu's CUDA driver API: the part of libcuda.so that cudarc and palign call, over host
// memory and the fiber runtime. One emulated device (sm_80 unless KEMU_SM says, 8 SMs,
// 16 GiB), one context; streams and events exist but all work runs at once, in call order.
//
// Device memory is host memory: each allocation ends just before an inaccessible page,
// so a kernel reading or writing past the end of its buffer faults (SIGSEGV) instead of
// passing silently; new allocations are filled with 0xff (NaN as bf16 and f32), as stale
// device memory would be. A failed launch (a trap, a deadlock, a bad launch shape) makes
// the context's error sticky, as on a GPU: later calls return it too.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "runtime.h"

namespace {

using CUresult = int;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_FOUND = 500,
                   LAUNCH_FAILED = 719, INVALID_HANDLE = 400;

constexpr size_t kTotalMem = size_t(16) << 30;
constexpr int kSmCount = 8;
constexpr int kSmemDefault = 48 * 1024;

// The emulated compute capability: KEMU_SM=80 (default, an A100's limits) or 90 (an
// H100's: the sm_90a wgmma kernel runs), 86 or 89.
int sm() {
    static const int v = [] {
        const char *e = std::getenv("KEMU_SM");
        const int s = e ? std::atoi(e) : 80;
        return s == 86 || s == 89 || s == 90 ? s : 80;
    }();
    return v;
}
// Opt-in shared memory per block (CUDA C Programming Guide, compute capabilities table).
int smem_optin() { return sm() == 90 ? 232448 : sm() == 80 ? 166912 : 101376; }

struct Function {
    const kemu::KernelEntry *k;
    int max_dynamic_smem = kSmemDefault;
};

struct Alloc {
    void *map;
    size_t map_len;
    size_t bytes;
};

std::mutex m;
std::map<uintptr_t, Alloc> allocs;
size_t allocated = 0;
std::atomic<CUresult> sticky{OK};
std::map<std::string, Function> functions;
int ctx_token, stream_token, module_token; // addresses used as opaque handles

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

} // namespace

extern "C" {

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int *v) {
    *v = 13000;
    return OK;
}
CUresult cuDeviceGetCount(int *n) {
    *n = 1;
    return OK;
}
CUresult cuDeviceGet(int *dev, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE;
    *dev = 0;
    return OK;
}
CUresult cuDeviceGetName(char *name, int len, int) {
    std::snprintf(name, len, "kemu CPU emulator (sm_%d)", sm());
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, int) {
    *bytes = kTotalMem;
    return OK;
}
CUresult cuDeviceGetUuid(unsigned char *uuid, int) {
    std::memset(uuid, 0x6b, 16);
    return OK;
}
CUresult cuDeviceGetUuid_v2(unsigned char *uuid, int dev) { return cuDeviceGetUuid(uuid, dev); }

CUresult cuDeviceGetAttribute(int *v, int attr, int) {
    switch (attr) {
    case 1: *v = 1024; break;         // MAX_THREADS_PER_BLOCK
    case 2: *v = 1024; break;         // MAX_BLOCK_DIM_X
    case 3: *v = 1024; break;         // MAX_BLOCK_DIM_Y
    case 4: *v = 64; break;           // MAX_BLOCK_DIM_Z
    case 5: *v = 2147483647; break;   // MAX_GRID_DIM_X
    case 6: *v = 65535; break;        // MAX_GRID_DIM_Y
    case 7: *v = 65535; break;        // MAX_GRID_DIM_Z
    case 8: *v = kSmemDefault; break; // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *v = 32; break;          // WARP_SIZE
    case 13: *v = 1410000; break;     // CLOCK_RATE (kHz)
    case 16: *v = kSmCount; break;    // MULTIPROCESSOR_COUNT
    case 36: *v = 1215000; break;     // MEMORY_CLOCK_RATE (kHz)
    case 37: *v = 5120; break;        // GLOBAL_MEMORY_BUS_WIDTH
    case 38: *v = 40 << 20; break;    // L2_CACHE_SIZE
    case 39: *v = sm() == 86 || sm() == 89 ? 1536 : 2048; break; // MAX_THREADS_PER_MULTIPROCESSOR
    case 75: *v = sm() / 10; break;   // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = sm() % 10; break;   // COMPUTE_CAPABILITY_MINOR
    case 81: *v = sm() == 90 ? 233472 : sm() == 80 ? 167936 : 102400; break; // SMEM_PER_SM
    case 97: *v = smem_optin(); break; // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    case 115: *v = 0; break;          // MEMORY_POOLS_SUPPORTED: plain cuMemAlloc
    default: *v = 0; break;
    }
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(void **ctx, int) {
    *ctx = &ctx_token;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void *) { return OK; }
CUresult cuCtxGetCurrent(void **ctx) {
    *ctx = &ctx_token;
    return OK;
}
CUresult cuCtxSynchronize() { return sticky; }
CUresult cuCtxSetLimit(int, size_t) { return OK; }
CUresult cuCtxGetStreamPriorityRange(int *lo, int *hi) {
    *lo = 0;
    *hi = 0;
    return OK;
}

CUresult cuStreamCreate(void **s, unsigned) {
    *s = &stream_token;
    return OK;
}
CUresult cuStreamCreateWithPriority(void **s, unsigned, int) {
    *s = &stream_token;
    return OK;
}
CUresult cuStreamDestroy_v2(void *) { return OK; }
CUresult cuStreamSynchronize(void *) { return sticky; }
CUresult cuStreamWaitEvent(void *, void *, unsigned) { return sticky; }
CUresult cuStreamIsCapturing(void *, int *status) {
    *status = 0;
    return OK;
}

// An event is the host time (ms) of its last record: all work before it is done then.
CUresult cuEventCreate(void **e, unsigned) {
    *e = new double(now_ms());
    return OK;
}
CUresult cuEventDestroy_v2(void *e) {
    delete static_cast<double *>(e);
    return OK;
}
CUresult cuEventRecord(void *e, void *) {
    *static_cast<double *>(e) = now_ms();
    return sticky;
}
CUresult cuEventSynchronize(void *) { return sticky; }
CUresult cuEventQuery(void *) { return sticky; }
CUresult cuEventElapsedTime(float *ms, void *a, void *b) {
    *ms = float(*static_cast<double *>(b) - *static_cast<double *>(a));
    return OK;
}
CUresult cuEventElapsedTime_v2(float *ms, void *a, void *b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuMemAlloc_v2(uint64_t *ptr, size_t bytes) {
    std::lock_guard<std::mutex> g(m);
    if (bytes == 0) return INVALID_VALUE;
    if (allocated + bytes > kTotalMem) return OUT_OF_MEMORY;
    const size_t page = sysconf(_SC_PAGESIZE);
    const size_t body = (bytes + 255) / 256 * 256; // cuMemAlloc aligns to 256 bytes
    const size_t pages = (body + page - 1) / page;
    const size_t len = (pages + 1) * page;
    void *map = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return OUT_OF_MEMORY;
    uint8_t *guard = static_cast<uint8_t *>(map) + pages * page;
    mprotect(guard, page, PROT_NONE);
    uint8_t *p = guard - body;
    std::memset(p, 0xff, body);
    allocs[reinterpret_cast<uintptr_t>(p)] = {map, len, bytes};
    allocated += bytes;
    *ptr = reinterpret_cast<uint64_t>(p);
    return OK;
}
CUresult cuMemFree_v2(uint64_t ptr) {
    std::lock_guard<std::mutex> g(m);
    auto it = allocs.find(uintptr_t(ptr));
    if (it == allocs.end()) return INVALID_VALUE;
    munmap(it->second.map, it->second.map_len);
    allocated -= it->second.bytes;
    allocs.erase(it);
    return OK;
}
CUresult cuMemAllocAsync(uint64_t *ptr, size_t bytes, void *) { return cuMemAlloc_v2(ptr, bytes); }
CUresult cuMemFreeAsync(uint64_t ptr, void *) { return cuMemFree_v2(ptr); }
CUresult cuMemGetInfo_v2(size_t *free, size_t *total) {
    std::lock_guard<std::mutex> g(m);
    *free = kTotalMem - allocated;
    *total = kTotalMem;
    return OK;
}
CUresult cuMemHostAlloc(void **p, size_t bytes, unsigned) {
    *p = std::malloc(bytes ? bytes : 1);
    return *p ? OK : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void *p) {
    std::free(p);
    return OK;
}

CUresult cuMemcpyHtoD_v2(uint64_t dst, const void *src, size_t n) {
    std::memcpy(reinterpret_cast<void *>(dst), src, n);
    return sticky;
}
CUresult cuMemcpyDtoH_v2(void *dst, uint64_t src, size_t n) {
    std::memcpy(dst, reinterpret_cast<const void *>(src), n);
    return sticky;
}
CUresult cuMemcpyDtoD_v2(uint64_t dst, uint64_t src, size_t n) {
    std::memmove(reinterpret_cast<void *>(dst), reinterpret_cast<const void *>(src), n);
    return sticky;
}
CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t n, void *) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, uint64_t src, size_t n, void *) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
CUresult cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void *) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
CUresult cuMemsetD8_v2(uint64_t dst, unsigned char v, size_t n) {
    std::memset(reinterpret_cast<void *>(dst), v, n);
    return sticky;
}
CUresult cuMemsetD8Async(uint64_t dst, unsigned char v, size_t n, void *) {
    return cuMemsetD8_v2(dst, v, n);
}
CUresult cuMemsetD32Async(uint64_t dst, unsigned v, size_t n, void *) {
    auto *p = reinterpret_cast<unsigned *>(dst);
    for (size_t i = 0; i < n; i++) p[i] = v;
    return sticky;
}
CUresult cuMemsetD32_v2(uint64_t dst, unsigned v, size_t n) { return cuMemsetD32Async(dst, v, n, nullptr); }

// The image (the embedded fatbin) is not read: the kernels are compiled into this library.
CUresult cuModuleLoadData(void **mod, const void *) {
    *mod = &module_token;
    return OK;
}
CUresult cuModuleUnload(void *) { return OK; }
CUresult cuModuleGetFunction(void **f, void *, const char *name) {
    std::lock_guard<std::mutex> g(m);
    auto it = functions.find(name);
    if (it == functions.end()) {
        for (int i = 0; i < kemu::kNumKernels; i++)
            if (std::strcmp(kemu::kKernels[i].name, name) == 0)
                it = functions.emplace(name, Function{&kemu::kKernels[i]}).first;
        if (it == functions.end()) return NOT_FOUND;
    }
    *f = &it->second;
    return OK;
}

CUresult cuFuncSetAttribute(void *f, int attr, int v) {
    auto *fn = static_cast<Function *>(f);
    if (attr == 8) { // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (v < 0 || v > smem_optin()) return INVALID_VALUE;
        fn->max_dynamic_smem = v;
    }
    return OK;
}
CUresult cuFuncGetAttribute(int *v, int attr, void *f) {
    auto *fn = static_cast<Function *>(f);
    switch (attr) {
    case 0: *v = 1024; break; // MAX_THREADS_PER_BLOCK
    case 4: *v = 64; break;   // NUM_REGS
    case 8: *v = fn->max_dynamic_smem; break;
    default: *v = 0; break;
    }
    return OK;
}
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int *n, void *, int block,
                                                              size_t smem, unsigned) {
    int by_threads = block > 0 ? 2048 / block : 0;
    int by_smem = smem ? int(167936 / smem) : 32;
    *n = std::max(0, std::min({by_threads, by_smem, 32}));
    return OK;
}
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int *n, void *f, int block, size_t smem) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(n, f, block, smem, 0);
}

CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned smem, void *, void **args,
                        void **extra) {
    if (sticky != OK) return sticky;
    auto *fn = static_cast<Function *>(f);
    if (!fn || !args || extra) return INVALID_VALUE;
    std::string err;
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
        err = "grid (" + std::to_string(gx) + "," + std::to_string(gy) + "," + std::to_string(gz) + ")";
    else if (bz > 64 || bx > 1024 || by > 1024)
        err = "block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + ")";
    else if (int(smem) > std::max(kSmemDefault, fn->max_dynamic_smem))
        err = std::to_string(smem) + " bytes of dynamic shared memory without opting in to them";
    if (!err.empty()) {
        std::fprintf(stderr, "kemu: bad launch of %s: %s\n", fn->k->name, err.c_str());
        return INVALID_VALUE;
    }
    if (!kemu::launch(*fn->k, dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, args, err)) {
        std::fprintf(stderr, "kemu: %s\n", err.c_str());
        sticky = LAUNCH_FAILED;
        return sticky;
    }
    return OK;
}

CUresult cuGetErrorName(CUresult e, const char **s) {
    switch (e) {
    case OK: *s = "CUDA_SUCCESS"; break;
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char **s) {
    cuGetErrorName(e, s);
    if (e == LAUNCH_FAILED) *s = "unspecified launch failure (kemu: see its message on stderr)";
    return OK;
}

} // extern "C"
