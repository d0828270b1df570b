// cudasim.h - run unmodified CUDA kernel source on the CPU.
//
// The loader (lgm_op/cudasim/__init__.py) compiles one translation unit per module:
//
//     #include "cudasim.h"
//     <the kernel source; `extern __shared__ T name[];` rewritten to a pointer into the dynamic
//      shared-memory buffer>
//     <one extern "C" launch entry and one signature entry per kernel>
//
// Execution model. Every CUDA thread is a fiber with its own small stack. Blocks run one after
// another (x fastest, then y, then z); inside a block the fibers run round-robin on the calling
// OS thread, each until it reaches a barrier or a warp operation, or exits. Because only one fiber
// runs at a time, plain memory accesses never race; the interleaving at barriers and warp
// operations is what the kernel's correctness has to rely on anyway.
//
// Faults the simulator reports (as an error string that the loader raises as SimError):
//   * __syncthreads() reached at different source lines by the threads of a block (divergence),
//   * warp operations that disagree (different calls, lines or masks),
//   * deadlock: live threads are waiting and none can proceed,
//   * bad launch configuration.
// Shared memory (static __shared__ variables and the dynamic buffer) is filled with 0xFF bytes
// before every block, so a read of a slot nobody wrote yields NaN (float/double) or -1 (int).
//
// Floating point: the module is compiled with -ffp-contract=off, so a*b+c is rounded twice and only
// explicit fmaf/fma calls are fused. NVCC and NVRTC contract by default (--fmad=true); kernels whose
// tests need bit-exact agreement should use explicit fmaf. Nothing here enables fast-math.
//
// Rules for this header: no function-local statics (the linker script gathers zero-initialised
// function-local statics as shared memory and poisons them), and the CUDA keyword macros are defined
// last so that the standard headers above never see them.
#pragma once

#include <atomic>
#include <bit>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <math.h>    // expf, sqrtf, fmaf, isnan, INFINITY, ... in the global namespace, as NVRTC has them
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>   // device-side printf
#include <strings.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Fiber stacks: 64 KiB each (more under AddressSanitizer, whose frames are larger), with an
// inaccessible guard page below each so that an overflow faults instead of corrupting memory.
#ifndef CUDASIM_STACK_SIZE
#if defined(__SANITIZE_ADDRESS__)
#define CUDASIM_STACK_SIZE (256 * 1024)
#else
#define CUDASIM_STACK_SIZE (64 * 1024)
#endif
#endif

// The context switch is a few lines of assembly on x86-64 and aarch64; anywhere else (or with
// -DCUDASIM_USE_UCONTEXT) it is ucontext's swapcontext, which is correct but makes a system call
// per switch.
#if !defined(CUDASIM_USE_UCONTEXT) && !defined(__x86_64__) && !defined(__aarch64__)
#define CUDASIM_USE_UCONTEXT 1
#endif
#if defined(CUDASIM_USE_UCONTEXT)
#include <ucontext.h>
#endif

// ------------------------------------------------------------------------------------------------
// CUDA vector types
// ------------------------------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return {x, y, z}; }
};
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

// The context switch: saves the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, switches to next_sp and pops the registers saved there.
#if !defined(CUDASIM_USE_UCONTEXT)
extern "C" __attribute__((visibility("hidden"))) void cudasim_switch(void** save_sp, void* next_sp);
#if defined(__x86_64__)
// Frame (low to high): mxcsr + x87 control word, r15, r14, r13, r12, rbx, rbp, return address.
asm(R"(
    .pushsection .text
    .p2align 4
    .globl cudasim_switch
    .hidden cudasim_switch
    .type cudasim_switch, @function
cudasim_switch:
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
    .size cudasim_switch, .-cudasim_switch
    .popsection
)");
#elif defined(__aarch64__)
// Frame of 160 bytes: x19..x28, x29 (frame pointer), x30 (return address), d8..d15.
asm(R"(
    .pushsection .text
    .p2align 4
    .globl cudasim_switch
    .hidden cudasim_switch
    .type cudasim_switch, %function
cudasim_switch:
    sub sp, sp, #160
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #160
    ret
    .size cudasim_switch, .-cudasim_switch
    .popsection
)");
#endif
#endif

// Bounds of the static shared memory, defined by the linker script the loader passes: every
// `__shared__` variable (section cudasim_shared) and every zero-initialised function-local static
// (.bss._ZZ*, where GCC puts statics of function templates even when they carry a section attribute).
extern "C" char __start_cudasim_shared[] __attribute__((visibility("hidden")));
extern "C" char __stop_cudasim_shared[] __attribute__((visibility("hidden")));

namespace cudasim {
namespace {  // internal linkage: every loaded module has its own simulator state

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;       // dynamic shared memory without opt-in on a GPU
constexpr unsigned long long kPoison = ~0ull;        // what a read of a lane that did not take part yields

enum class State : unsigned char { ready, barrier, warp, done, abandoned };
enum class Op : unsigned char { syncthreads, syncwarp, shfl, shfl_up, shfl_down, shfl_xor, ballot, any, all };

const char* op_name(Op op) {
    switch (op) {
    case Op::syncthreads: return "__syncthreads";
    case Op::syncwarp: return "__syncwarp";
    case Op::shfl: return "__shfl_sync";
    case Op::shfl_up: return "__shfl_up_sync";
    case Op::shfl_down: return "__shfl_down_sync";
    case Op::shfl_xor: return "__shfl_xor_sync";
    case Op::ballot: return "__ballot_sync";
    case Op::any: return "__any_sync";
    case Op::all: return "__all_sync";
    }
    return "?";
}

struct Fiber {
    void* sp;                 // saved stack pointer while suspended
#if defined(CUDASIM_USE_UCONTEXT)
    ucontext_t context;
#endif
    char* stack;              // lowest usable byte; the guard page lies just below
    void* asan_fake_stack;
    uint3 tid;
    unsigned linear;          // x + y*blockDim.x + z*blockDim.x*blockDim.y; lane = linear % 32
    State state;
    Op op;                    // what the fiber waits in (state barrier or warp)
    int line;                 // source line of that call
    unsigned mask;            // warp operations: the lanes taking part
    int param;                // shuffles: source lane, delta or lane mask; barriers: participants
    int width;                // shuffles: segment width
    unsigned long long value; // what this thread contributes
    unsigned long long result;// what it receives
};

struct Launch {
    const char* kernel;
    void (*invoke)(void*);    // calls the kernel with the launch arguments
    void* args;
    dim3 grid, block;
    uint3 block_idx;
    unsigned nthreads, live, at_barrier;
    void* scheduler_sp;
#if defined(CUDASIM_USE_UCONTEXT)
    ucontext_t scheduler_context;
#endif
    const void* scheduler_stack;   // reported by AddressSanitizer's fiber API
    size_t scheduler_stack_size;
    void* scheduler_fake_stack;
    bool failed;
    char error[1024];
};

Fiber g_fibers[kMaxThreads];
Launch* g_launch = nullptr;
Fiber* g_cur = nullptr;           // the running fiber
std::mutex g_mutex;               // one launch at a time per module
bool g_stacks_dirty = false;      // a launch was abandoned with fibers in mid-call (ASan shadow)
alignas(128) unsigned char g_dynamic_shared[kMaxSharedBytes];

// --- AddressSanitizer fiber hooks -----------------------------------------------------------------
#if defined(__SANITIZE_ADDRESS__)
inline void asan_start(void** fake, const void* bottom, size_t size) { __sanitizer_start_switch_fiber(fake, bottom, size); }
inline void asan_finish(void* fake, const void** bottom, size_t* size) { __sanitizer_finish_switch_fiber(fake, bottom, size); }
#else
inline void asan_start(void**, const void*, size_t) {}
inline void asan_finish(void*, const void**, size_t*) {}
#endif

// Fill memory with 0xFF bytes. Under AddressSanitizer this avoids the checked memset, in case the
// shared section holds redzones between variables.
#if defined(__SANITIZE_ADDRESS__)
__attribute__((no_sanitize_address)) void poison_bytes(void* begin, size_t n) {
    auto* p = static_cast<unsigned char*>(begin);
    for (; n && reinterpret_cast<uintptr_t>(p) % 8; --n) *reinterpret_cast<volatile unsigned char*>(p++) = 0xFF;
    for (; n >= 8; n -= 8, p += 8) *reinterpret_cast<volatile uint64_t*>(p) = ~uint64_t(0);
    for (; n; --n) *reinterpret_cast<volatile unsigned char*>(p++) = 0xFF;
}
#else
void poison_bytes(void* begin, size_t n) { std::memset(begin, 0xFF, n); }
#endif

// --- messages -------------------------------------------------------------------------------------
__attribute__((format(printf, 2, 3))) void set_error(Launch& L, const char* fmt, ...) {
    int n = snprintf(L.error, sizeof L.error, "kernel '%s', block (%u,%u,%u): ", L.kernel,
                     L.block_idx.x, L.block_idx.y, L.block_idx.z);
    if (n < 0 || size_t(n) >= sizeof L.error) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L.error + n, sizeof L.error - n, fmt, ap);
    va_end(ap);
    L.failed = true;
}

// --- switching between the scheduler and the fibers ----------------------------------------------
[[noreturn]] void fiber_main();

void prepare(Fiber& f) {
#if defined(CUDASIM_USE_UCONTEXT)
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = CUDASIM_STACK_SIZE;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
#else
    // A frame as cudasim_switch leaves it, whose return address is fiber_main; the stack is
    // aligned as at a function entry. Zero frame pointer and return slot end backtraces there.
    auto top = reinterpret_cast<uintptr_t>(f.stack + CUDASIM_STACK_SIZE) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
#if defined(__x86_64__)
    *--sp = nullptr;                                                   // fiber_main's return address
    *--sp = reinterpret_cast<void*>(&fiber_main);                      // popped by `ret`
    for (int i = 0; i < 6; ++i) *--sp = nullptr;                       // rbp rbx r12 r13 r14 r15
    *--sp = reinterpret_cast<void*>(uintptr_t(0x1F80) | (uintptr_t(0x037F) << 32));  // default mxcsr, x87 cw
#else
    sp -= 20;
    std::memset(sp, 0, 160);
    sp[11] = reinterpret_cast<void*>(&fiber_main);                     // x30
#endif
    f.sp = sp;
#endif
}

// Scheduler -> fiber; returns when the fiber suspends or exits.
void resume(Launch& L, Fiber& f) {
    g_cur = &f;
    asan_start(&L.scheduler_fake_stack, f.stack, CUDASIM_STACK_SIZE);
#if defined(CUDASIM_USE_UCONTEXT)
    swapcontext(&L.scheduler_context, &f.context);
#else
    cudasim_switch(&L.scheduler_sp, f.sp);
#endif
    asan_finish(L.scheduler_fake_stack, nullptr, nullptr);
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber (never, if it exited).
void suspend(bool exiting) {
    Launch& L = *g_launch;
    Fiber& f = *g_cur;
    asan_start(exiting ? nullptr : &f.asan_fake_stack, L.scheduler_stack, L.scheduler_stack_size);
#if defined(CUDASIM_USE_UCONTEXT)
    swapcontext(&f.context, &L.scheduler_context);
#else
    cudasim_switch(&f.sp, L.scheduler_sp);
#endif
    asan_finish(f.asan_fake_stack, &L.scheduler_stack, &L.scheduler_stack_size);
}

// A fault found by a running thread: record it and never run this fiber again.
[[noreturn]] void abandon() {
    g_cur->state = State::abandoned;
    suspend(false);
    __builtin_unreachable();
}

// --- barriers ---------------------------------------------------------------------------------------
// __syncthreads is a counting barrier over the block's live threads: it opens when every thread that
// has not exited waits at it. Waiting at different source lines is reported as divergence.
void open_barrier(Launch& L) {
    const Fiber* first = nullptr;
    unsigned count = 0;
    for (unsigned i = 0; i < L.nthreads; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.state != State::barrier) continue;
        if (!first) {
            first = &f;
        } else if (f.line != first->line) {
            set_error(L, "divergent __syncthreads: thread (%u,%u,%u) waits at line %d but thread (%u,%u,%u) "
                         "at line %d", first->tid.x, first->tid.y, first->tid.z, first->line,
                      f.tid.x, f.tid.y, f.tid.z, f.line);
            abandon();
        }
        count += f.value != 0;
    }
    for (unsigned i = 0; i < L.nthreads; ++i) {
        Fiber& f = g_fibers[i];
        if (f.state != State::barrier) continue;
        f.state = State::ready;
        f.result = count;
        f.param = int(L.at_barrier);
    }
    L.at_barrier = 0;
}

// Returns how many of the participating threads passed a non-zero predicate.
unsigned block_barrier(int line, int predicate) {
    Launch& L = *g_launch;
    Fiber& f = *g_cur;
    f.state = State::barrier;
    f.op = Op::syncthreads;
    f.line = line;
    f.value = predicate != 0;
    if (++L.at_barrier == L.live)
        open_barrier(L);   // the last to arrive releases everyone and carries on
    else
        suspend(false);
    return unsigned(f.result);
}

// --- warp operations -----------------------------------------------------------------------------
// A warp operation completes when every live lane named in the caller's mask waits in one. The lane
// that completes it computes every participant's result, so no slot is reused while still needed.
unsigned live_lanes(const Launch& L, unsigned warp) {
    unsigned base = warp * 32, n = L.nthreads - base < 32 ? L.nthreads - base : 32, live = 0;
    for (unsigned i = 0; i < n; ++i)
        if (g_fibers[base + i].state != State::done) live |= 1u << i;
    return live;
}

void finish_group(Fiber* lanes, unsigned group) {
    const Fiber& a = lanes[std::countr_zero(group)];
    unsigned votes = 0;
    for (unsigned g = group; g; g &= g - 1) {
        unsigned j = std::countr_zero(g);
        if (lanes[j].value) votes |= 1u << j;
    }
    for (unsigned g = group; g; g &= g - 1) {
        unsigned j = std::countr_zero(g);
        Fiber& b = lanes[j];
        unsigned w = unsigned(b.width), seg = j & ~(w - 1), off = j - seg, src = j, d = unsigned(b.param);
        bool own = false;
        switch (a.op) {
        case Op::shfl: src = seg + (d & (w - 1)); break;
        case Op::shfl_up: own = d > off; src = j - d; break;
        case Op::shfl_down: own = off + d >= w; src = j + d; break;
        case Op::shfl_xor: src = j ^ (d & 31); own = src >= seg + w; break;
        default: break;
        }
        switch (a.op) {
        case Op::syncwarp: b.result = 0; break;
        case Op::ballot: b.result = votes; break;
        case Op::any: b.result = votes != 0; break;
        case Op::all: b.result = votes == group; break;
        default: b.result = own ? b.value : (src < 32 && (group >> src & 1)) ? lanes[src].value : kPoison;
        }
        b.state = State::ready;
    }
}

void complete_warp(Launch& L, unsigned warp) {
    Fiber* lanes = g_fibers + warp * 32;
    unsigned live = live_lanes(L, warp), waiting = 0;
    for (unsigned l = live; l; l &= l - 1)
        if (lanes[std::countr_zero(l)].state == State::warp) waiting |= 1u << std::countr_zero(l);
    for (unsigned todo = waiting; todo;) {
        const Fiber& a = lanes[std::countr_zero(todo)];
        unsigned group = a.mask & live;
        todo &= ~group;   // a is in its own group: every lane checks that its mask names itself
        if ((group & waiting) != group) continue;   // some named lane has not arrived yet
        for (unsigned g = group; g; g &= g - 1) {
            const Fiber& b = lanes[std::countr_zero(g)];
            bool same_call = b.op == a.op && b.mask == a.mask && (a.op == Op::syncwarp || b.line == a.line);
            if (!same_call) {
                set_error(L, "divergent warp operations: thread (%u,%u,%u) waits in %s at line %d with mask "
                             "0x%08x but thread (%u,%u,%u) in %s at line %d with mask 0x%08x",
                          a.tid.x, a.tid.y, a.tid.z, op_name(a.op), a.line, a.mask,
                          b.tid.x, b.tid.y, b.tid.z, op_name(b.op), b.line, b.mask);
                abandon();
            }
        }
        finish_group(lanes, group);
    }
}

unsigned long long warp_op(Op op, int line, unsigned mask, unsigned long long value, int param = 0,
                           int width = 32) {
    Launch& L = *g_launch;
    Fiber& f = *g_cur;
    unsigned lane = f.linear % 32;
    if (!(mask >> lane & 1)) {
        set_error(L, "thread (%u,%u,%u) (lane %u) calls %s at line %d with mask 0x%08x, which does not "
                     "include its own lane", f.tid.x, f.tid.y, f.tid.z, lane, op_name(op), line, mask);
        abandon();
    }
    if (width < 1 || width > 32 || (width & (width - 1))) {
        set_error(L, "thread (%u,%u,%u) calls %s at line %d with width %d (must be a power of 2 up to 32)",
                  f.tid.x, f.tid.y, f.tid.z, op_name(op), line, width);
        abandon();
    }
    f.state = State::warp;
    f.op = op;
    f.line = line;
    f.mask = mask;
    f.value = value;
    f.param = param;
    f.width = width;
    complete_warp(L, f.linear / 32);
    if (f.state == State::warp) suspend(false);
    return f.result;
}

template <class T>
T shuffle(Op op, int line, unsigned mask, T v, int param, int width) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 4- or 8-byte values");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = warp_op(op, line, mask, bits, param, width);
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

// --- thread exit and the scheduler ------------------------------------------------------------------
[[noreturn]] void thread_exit() {
    Launch& L = *g_launch;
    Fiber& f = *g_cur;
    f.state = State::done;
    --L.live;
    if (L.at_barrier && L.at_barrier == L.live) open_barrier(L);   // it no longer holds the others up
    complete_warp(L, f.linear / 32);
    suspend(true);
    __builtin_unreachable();
}

[[noreturn]] void fiber_main() {
    Launch& L = *g_launch;
    asan_finish(nullptr, &L.scheduler_stack, &L.scheduler_stack_size);
    L.invoke(L.args);
    thread_exit();
}

void report_deadlock(Launch& L) {
    char text[600] = "";
    size_t used = 0;
    int shown = 0;
    for (unsigned i = 0; i < L.nthreads && shown < 3; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.state != State::barrier && f.state != State::warp) continue;
        bool seen = false;   // list each (call, line) once
        for (unsigned k = 0; k < i && !seen; ++k)
            seen = (g_fibers[k].state == State::barrier || g_fibers[k].state == State::warp) &&
                   g_fibers[k].op == f.op && g_fibers[k].line == f.line;
        if (seen) continue;
        unsigned count = 0;
        for (unsigned k = i; k < L.nthreads; ++k)
            count += (g_fibers[k].state == State::barrier || g_fibers[k].state == State::warp) &&
                     g_fibers[k].op == f.op && g_fibers[k].line == f.line;
        int n = snprintf(text + used, sizeof text - used, "%s%u thread(s) wait in %s at line %d (e.g. thread "
                         "(%u,%u,%u)%s", shown ? "; " : "", count, op_name(f.op), f.line, f.tid.x, f.tid.y,
                         f.tid.z, f.state == State::warp ? ", mask " : ")");
        if (n > 0) used = used + n < sizeof text ? used + n : sizeof text - 1;
        if (f.state == State::warp) {
            n = snprintf(text + used, sizeof text - used, "0x%08x)", f.mask);
            if (n > 0) used = used + n < sizeof text ? used + n : sizeof text - 1;
        }
        ++shown;
    }
    set_error(L, "deadlock: %u live thread(s) wait and none can proceed: %s", L.live, text);
}

void run_block(Launch& L) {
    const unsigned bx = L.block.x, bxy = L.block.x * L.block.y;
    for (unsigned t = 0; t < L.nthreads; ++t) {
        Fiber& f = g_fibers[t];
        f.tid = {t % bx, t % bxy / bx, t / bxy};
        f.linear = t;
        f.state = State::ready;
        f.asan_fake_stack = nullptr;
        prepare(f);
    }
    L.live = L.nthreads;
    L.at_barrier = 0;
    while (L.live && !L.failed) {
        bool ran = false;
        for (unsigned t = 0; t < L.nthreads && !L.failed; ++t)
            if (g_fibers[t].state == State::ready) {
                ran = true;
                resume(L, g_fibers[t]);
            }
        if (!ran && !L.failed) report_deadlock(L);
    }
}

bool ensure_stacks(Launch& L, unsigned n) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = g_fibers[i];
        if (f.stack) continue;
        void* p = mmap(nullptr, page + CUDASIM_STACK_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) {
            set_error(L, "cannot allocate a fiber stack for thread %u", i);
            return false;
        }
        f.stack = static_cast<char*>(p) + page;
    }
    return true;
}

bool check_config(Launch& L, const long long* cfg, unsigned long long shmem) {
    static_assert(sizeof(long long) == 8);
    const char* names[6] = {"gridDim.x", "gridDim.y", "gridDim.z", "blockDim.x", "blockDim.y", "blockDim.z"};
    const long long limits[6] = {2147483647LL, 65535, 65535, 1024, 1024, 64};
    for (int i = 0; i < 6; ++i)
        if (cfg[i] < 1 || cfg[i] > limits[i]) {
            set_error(L, "bad launch configuration: %s = %lld (must be 1..%lld)", names[i], cfg[i], limits[i]);
            return false;
        }
    if (cfg[3] * cfg[4] * cfg[5] > kMaxThreads) {
        set_error(L, "bad launch configuration: %lld threads per block (at most %u)", cfg[3] * cfg[4] * cfg[5],
                  kMaxThreads);
        return false;
    }
    // Only the dynamic size is checked: the static shared memory is known per module, not per kernel.
    if (shmem > kMaxSharedBytes) {
        set_error(L, "bad launch configuration: %llu bytes of dynamic shared memory (at most %zu)", shmem,
                  kMaxSharedBytes);
        return false;
    }
    return true;
}

// Runs a whole grid. Returns 0, or 1 with a message in err.
int run_grid(const char* kernel, void (*invoke)(void*), void* args, const long long* cfg,
             unsigned long long shmem, char* err, unsigned long long errlen) {
    std::lock_guard<std::mutex> lock(g_mutex);
    Launch L{};
    L.kernel = kernel;
    L.invoke = invoke;
    L.args = args;
    if (check_config(L, cfg, shmem)) {
        L.grid = dim3(unsigned(cfg[0]), unsigned(cfg[1]), unsigned(cfg[2]));
        L.block = dim3(unsigned(cfg[3]), unsigned(cfg[4]), unsigned(cfg[5]));
        L.nthreads = L.block.x * L.block.y * L.block.z;
    }
    if (!L.failed && ensure_stacks(L, L.nthreads)) {
#if defined(__SANITIZE_ADDRESS__)
        if (g_stacks_dirty)   // abandoned fibers left poisoned frames behind
            for (Fiber& f : g_fibers)
                if (f.stack) ASAN_UNPOISON_MEMORY_REGION(f.stack, CUDASIM_STACK_SIZE);
        ASAN_UNPOISON_MEMORY_REGION(g_dynamic_shared, kMaxSharedBytes);
        ASAN_POISON_MEMORY_REGION(g_dynamic_shared + shmem, kMaxSharedBytes - shmem);
#endif
        g_stacks_dirty = false;
        g_launch = &L;
        for (unsigned z = 0; z < L.grid.z && !L.failed; ++z)
            for (unsigned y = 0; y < L.grid.y && !L.failed; ++y)
                for (unsigned x = 0; x < L.grid.x && !L.failed; ++x) {
                    L.block_idx = {x, y, z};
                    poison_bytes(__start_cudasim_shared, size_t(__stop_cudasim_shared - __start_cudasim_shared));
                    poison_bytes(g_dynamic_shared, size_t(shmem));
                    run_block(L);
                }
        g_launch = nullptr;
        g_cur = nullptr;
        g_stacks_dirty = L.failed;
    }
    if (!L.failed) return 0;
    if (errlen) snprintf(err, size_t(errlen), "%s", L.error);
    return 1;
}

// --- the typed entry points used by the generated wrappers -----------------------------------------
template <class... A, size_t... I>
void load_args(std::tuple<A...>& values, void* const* argv, std::index_sequence<I...>) {
    (std::memcpy(&std::get<I>(values), argv[I], sizeof(A)), ...);
}

// argv[i] points at the value of parameter i (for a pointer parameter: at the pointer), as the
// kernelParams of cuLaunchKernel do.
template <class... A>
int launch(void (*kernel)(A...), const char* name, void* const* argv, const long long* cfg,
           unsigned long long shmem, char* err, unsigned long long errlen) {
    struct Call {
        void (*kernel)(A...);
        std::tuple<std::remove_cv_t<A>...> values;
    } call{kernel, {}};
    load_args(call.values, argv, std::index_sequence_for<A...>{});
    auto invoke = [](void* p) {
        Call* c = static_cast<Call*>(p);
        std::apply(c->kernel, c->values);
    };
    return run_grid(name, invoke, &call, cfg, shmem, err, errlen);
}

// The parameter types of a kernel, as "<code>|<C type>;" per parameter. Codes: f4 f8 (floating),
// i1..i8 u1..u8 (integers), b1 (bool), '?' (anything else); a pointer is '*', then 'c' if it points
// to const, then the code of what it points to, or 'v' for void.
template <class T>
constexpr std::string_view type_name() {
    std::string_view p = __PRETTY_FUNCTION__;   // "... [with T = const float*; ...]"
    size_t b = p.find("T = ") + 4;
    return p.substr(b, p.find_first_of(";]", b) - b);
}

template <class T>
constexpr std::string_view scalar_code() {
    using U = std::remove_cv_t<T>;
    constexpr std::string_view s[] = {"i1", "i2", "", "i4", "", "", "", "i8"};
    constexpr std::string_view u[] = {"u1", "u2", "", "u4", "", "", "", "u8"};
    if constexpr (std::is_same_v<U, bool>) return "b1";
    else if constexpr (std::is_same_v<U, float>) return "f4";
    else if constexpr (std::is_same_v<U, double>) return "f8";
    else if constexpr (std::is_integral_v<U> && sizeof(U) <= 8) return std::is_signed_v<U> ? s[sizeof(U) - 1] : u[sizeof(U) - 1];
    else return "?";
}

struct Writer {
    char* buf;
    size_t len, pos;
    void put(std::string_view s) {
        for (char c : s) {
            if (pos + 1 < len) buf[pos] = c;
            ++pos;
        }
        if (len) buf[pos < len ? pos : len - 1] = '\0';
    }
};

template <class T>
void describe(Writer& w) {
    if constexpr (std::is_pointer_v<T>) {
        using P = std::remove_pointer_t<T>;
        w.put(std::is_const_v<P> ? "*c" : "*");
        if constexpr (std::is_void_v<P>) w.put("v");
        else w.put(scalar_code<P>());
    } else {
        w.put(scalar_code<T>());
    }
    w.put("|");
    w.put(type_name<T>());
    w.put(";");
}

// Writes the signature into buf (NUL-terminated, truncated to len) and returns its full length.
template <class... A>
unsigned long long signature(void (*)(A...), char* buf, unsigned long long len) {
    Writer w{buf, size_t(len), 0};
    w.put("");
    (describe<A>(w), ...);
    return w.pos;
}

}  // namespace
}  // namespace cudasim

// ------------------------------------------------------------------------------------------------
// The device API
// ------------------------------------------------------------------------------------------------
namespace cudasim {
namespace {
inline const uint3& thread_idx() { return g_cur->tid; }
inline const uint3& block_idx() { return g_launch->block_idx; }
inline const dim3& block_dim() { return g_launch->block; }
inline const dim3& grid_dim() { return g_launch->grid; }
inline void* dynamic_shared() { return g_dynamic_shared; }

inline void syncthreads(int line) { block_barrier(line, 1); }
inline int syncthreads_count(int line, int p) { return int(block_barrier(line, p)); }
inline int syncthreads_and(int line, int p) { return block_barrier(line, p) == unsigned(g_cur->param); }
inline int syncthreads_or(int line, int p) { return block_barrier(line, p) != 0; }
inline void syncwarp(int line, unsigned mask = 0xffffffffu) { warp_op(Op::syncwarp, line, mask, 0); }
inline unsigned ballot_sync(int line, unsigned mask, int p) { return unsigned(warp_op(Op::ballot, line, mask, p != 0)); }
inline int any_sync(int line, unsigned mask, int p) { return int(warp_op(Op::any, line, mask, p != 0)); }
inline int all_sync(int line, unsigned mask, int p) { return int(warp_op(Op::all, line, mask, p != 0)); }
inline unsigned activemask() { return live_lanes(*g_launch, g_cur->linear / 32); }

#define CUDASIM_SHUFFLES(T)                                                                                  \
    inline T shfl_sync(int line, unsigned m, T v, int src, int w = 32) { return shuffle(Op::shfl, line, m, v, src, w); } \
    inline T shfl_up_sync(int line, unsigned m, T v, unsigned d, int w = 32) { return shuffle(Op::shfl_up, line, m, v, int(d), w); } \
    inline T shfl_down_sync(int line, unsigned m, T v, unsigned d, int w = 32) { return shuffle(Op::shfl_down, line, m, v, int(d), w); } \
    inline T shfl_xor_sync(int line, unsigned m, T v, int lm, int w = 32) { return shuffle(Op::shfl_xor, line, m, v, lm, w); }
CUDASIM_SHUFFLES(int)
CUDASIM_SHUFFLES(unsigned int)
CUDASIM_SHUFFLES(long)
CUDASIM_SHUFFLES(unsigned long)
CUDASIM_SHUFFLES(long long)
CUDASIM_SHUFFLES(unsigned long long)
CUDASIM_SHUFFLES(float)
CUDASIM_SHUFFLES(double)
#undef CUDASIM_SHUFFLES

template <class T, class F>
T atomic_update(T* p, F next) {
    std::atomic_ref<T> r(*p);
    T old = r.load(std::memory_order_relaxed);
    while (!r.compare_exchange_weak(old, next(old))) {}
    return old;
}
}  // namespace
}  // namespace cudasim

// Built-in variables, barriers and warp operations. Those that synchronise pass __LINE__ so that a
// fault can name the call.
#define threadIdx (::cudasim::thread_idx())
#define blockIdx (::cudasim::block_idx())
#define blockDim (::cudasim::block_dim())
#define gridDim (::cudasim::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ::cudasim::syncthreads(__LINE__)
#define __syncthreads_count(p) ::cudasim::syncthreads_count(__LINE__, (p))
#define __syncthreads_and(p) ::cudasim::syncthreads_and(__LINE__, (p))
#define __syncthreads_or(p) ::cudasim::syncthreads_or(__LINE__, (p))
#define __syncwarp(...) ::cudasim::syncwarp(__LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::cudasim::shfl_sync(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cudasim::shfl_up_sync(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cudasim::shfl_down_sync(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cudasim::shfl_xor_sync(__LINE__, __VA_ARGS__)
#define __ballot_sync(m, p) ::cudasim::ballot_sync(__LINE__, (m), (p))
#define __any_sync(m, p) ::cudasim::any_sync(__LINE__, (m), (p))
#define __all_sync(m, p) ::cudasim::all_sync(__LINE__, (m), (p))
inline unsigned __activemask() { return ::cudasim::activemask(); }

// Memory fences are no-ops beyond ordering: one fiber runs at a time.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
inline T __ldg(const T* p) { return *p; }

// --- atomics --------------------------------------------------------------------------------------
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return std::atomic_ref<unsigned long long>(*p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline int atomicSub(int* p, int v) { return std::atomic_ref<int>(*p).fetch_sub(v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_sub(v); }
#define CUDASIM_ATOMIC_INT(T)                                                                              \
    inline T atomicMin(T* p, T v) { return ::cudasim::atomic_update(p, [v](T o) { return v < o ? v : o; }); } \
    inline T atomicMax(T* p, T v) { return ::cudasim::atomic_update(p, [v](T o) { return v > o ? v : o; }); } \
    inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }                           \
    inline T atomicCAS(T* p, T expected, T v) {                                                              \
        std::atomic_ref<T>(*p).compare_exchange_strong(expected, v);                                         \
        return expected;                                                                                     \
    }
CUDASIM_ATOMIC_INT(int)
CUDASIM_ATOMIC_INT(unsigned)
CUDASIM_ATOMIC_INT(long long)
CUDASIM_ATOMIC_INT(unsigned long long)
#undef CUDASIM_ATOMIC_INT
#define CUDASIM_ATOMIC_BITS(T)                                                                     \
    inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }                   \
    inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }                    \
    inline T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v); }
CUDASIM_ATOMIC_BITS(int)
CUDASIM_ATOMIC_BITS(unsigned)
CUDASIM_ATOMIC_BITS(unsigned long long)
#undef CUDASIM_ATOMIC_BITS
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v); }

// --- math beyond <math.h> -----------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.0f), 1.0f); }   // NaN -> 0, as on the GPU
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return fma(x, y, z); }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }   // round half to even
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rd(float x) { return int(floorf(x)); }
inline int __float2int_ru(float x) { return int(ceilf(x)); }
inline int __double2int_rn(double x) { return int(nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(unsigned(x)); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return ffs(x); }
inline int __ffsll(long long x) { return ffsll(x); }

// min/max overloads as CUDA declares them (mixed signedness gives the unsigned type).
#define CUDASIM_MINMAX(R, A, B)                              \
    inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
    inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); }
CUDASIM_MINMAX(int, int, int)
CUDASIM_MINMAX(unsigned, unsigned, unsigned)
CUDASIM_MINMAX(unsigned, int, unsigned)
CUDASIM_MINMAX(unsigned, unsigned, int)
CUDASIM_MINMAX(long, long, long)
CUDASIM_MINMAX(unsigned long, unsigned long, unsigned long)
CUDASIM_MINMAX(long long, long long, long long)
CUDASIM_MINMAX(unsigned long long, unsigned long long, unsigned long long)
CUDASIM_MINMAX(unsigned long long, long long, unsigned long long)
CUDASIM_MINMAX(unsigned long long, unsigned long long, long long)
#undef CUDASIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// ------------------------------------------------------------------------------------------------
// CUDA keywords (last, so that the standard headers above are not affected)
// ------------------------------------------------------------------------------------------------
#define __CUDACC__ 1
#define __CUDACC_RTC__ 1
#define __CUDA_ARCH__ 700   // device code path, with Volta's independent thread scheduling
#define __CUDASIM__ 1
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Function-local `static` puts the variable in the module's shared-memory range (see above); the
// simulator refills that range with 0xFF bytes before every block.
#define __shared__ static __attribute__((section("cudasim_shared"), used))
