// kemu internals shared by runtime.cpp (fibers, barriers, warp collectives, launches),
// driver.cpp (the CUDA driver API) and the generated kernel table.
#pragma once

#include <string>

#include "kemu.h"

namespace kemu {

// One kernel of the table build.sh generates: `call` unpacks cuLaunchKernel's argument
// array (every palign kernel takes one parameter struct by value).
struct KernelEntry {
    const char *name;
    void *fn;
    void (*call)(void *fn, void **args);
    int max_threads; // __launch_bounds__, or 1024
};

template <class P> KernelEntry entry(const char *name, void (*fn)(P), int max_threads = 1024) {
    return {name, reinterpret_cast<void *>(fn),
            [](void *f, void **args) {
                reinterpret_cast<void (*)(P)>(f)(*static_cast<P *>(args[0]));
            },
            max_threads};
}

extern const KernelEntry kKernels[];
extern const int kNumKernels;

// Runs every block of one launch; false (with the first failure in `err`) when a thread
// trapped or the block deadlocked.
bool launch(const KernelEntry &k, dim3 grid, dim3 block, unsigned smem_bytes, void **args,
            std::string &err);

} // namespace kemu
