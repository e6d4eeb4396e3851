// Work shared among the OpenMP threads span by span: each thread takes the next undone span of tasks when it is
// free, instead of a fixed share. Tasks of unequal cost even out (a prompt chunk's later rows attend to more keys),
// and a thread that loses its core for a while (the gateway, Redis and the clients share the machine's cores) does
// not keep the others waiting at the end of the call with its share undone. Spans of consecutive tasks, a few per
// thread: a task's neighbours read the memory after its own, and a thread takes a span, not each task, from the
// shared counter. A task's result does not depend on which thread runs it.
#pragma once
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

constexpr int64_t SPANS_PER_THREAD = 8;

inline int64_t div_up(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <typename Task>
void for_each_task(int64_t n, const Task& task) {
    if (n <= 0) return;
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
    const int64_t span = std::max<int64_t>(1, n / (SPANS_PER_THREAD * threads));
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(threads))
    for (int64_t begin = next.fetch_add(span); begin < n; begin = next.fetch_add(span))
        for (int64_t i = begin; i < std::min(n, begin + span); ++i) task(i);
}

// The block kernels' work: each thread a fixed share of the n tasks, taken in order, `rounds` times over (their
// chunks of rows); a thread done with its share then takes what is left of the others', task by task. A share read
// front to back keeps each thread's reads of the weights one stream from memory (spans from one counter, as above,
// made calls of up to 8 rows 10-40% slower), and a thread that loses its core for a while, or runs on the slower
// core of a VM, no longer keeps the other waiting with part of its share undone (a Zen 3, the model's block calls of
// a step with another process busy half the time on one core: 32 rows 73 -> 66 ms, 128 rows 266 -> 231 ms). Every
// thread of the `#pragma omp parallel` team calls run() for each round.
class Shares {
public:
    Shares(int64_t n, int threads, int64_t rounds = 1)
        : n_(n), threads_(threads), per_(div_up(n, threads)), next_(new Counter[rounds * threads]) {
        for (int64_t r = 0; r < rounds; ++r)
            for (int t = 0; t < threads; ++t) next_[r * threads + t].next = t * per_;
    }

    template <typename Task>
    void run(const Task& task, int64_t round = 0) {
        const int self = omp_get_thread_num() % threads_;
        for (int k = 0; k < threads_; ++k) {
            const int owner = (self + k) % threads_;
            std::atomic<int64_t>& next = next_[round * threads_ + owner].next;
            const int64_t end = std::min(n_, (owner + 1) * per_);
            for (int64_t i = next.fetch_add(1); i < end; i = next.fetch_add(1)) task(i);
        }
    }

private:
    struct alignas(64) Counter {
        std::atomic<int64_t> next;
    };
    int64_t n_;
    int threads_;
    int64_t per_;
    std::unique_ptr<Counter[]> next_;
};
