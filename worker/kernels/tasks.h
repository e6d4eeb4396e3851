// Work shared among the OpenMP threads span by span: each thread takes the next undone span of tasks when it is
// free, instead of a fixed share. Tasks of unequal cost even out (a prompt chunk's later rows attend to more keys),
// and a thread that loses its core for a while (the gateway, Redis and the clients share the machine's cores) does
// not keep the others waiting at the end of the call with its share undone. Spans of consecutive tasks, a few per
// thread: a task's neighbours read the memory after its own, and a thread takes a span, not each task, from the
// shared counter. A task's result does not depend on which thread runs it. (The block kernels keep fixed shares:
// taken span by span, calls of up to 8 rows, which stream the weights from memory, ran 10-40% slower.)
#pragma once
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

constexpr int64_t SPANS_PER_THREAD = 8;

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
