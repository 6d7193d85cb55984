// A minimal parallel-for: splits [0, n) into contiguous chunks handed out to `nthreads` threads.
//
// Work is claimed chunk by chunk from an atomic counter (rows of different cost balance out);
// the first exception thrown by any worker is rethrown on the calling thread after all joined.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ql {

template <class Fn>
void parallel_for(int64_t n, int64_t chunk, int nthreads, Fn&& fn) {
    if (n <= 0) return;
    chunk = std::max<int64_t>(1, chunk);
    const int64_t nchunks = (n + chunk - 1) / chunk;
    const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, nchunks)));
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto run = [&]() {
        for (;;) {
            const int64_t c = next.fetch_add(1);
            if (c >= nchunks) return;
            try {
                fn(c * chunk, std::min(n, (c + 1) * chunk));
            } catch (...) {
                std::lock_guard<std::mutex> lock(error_mutex);
                if (!error) error = std::current_exception();
                next.store(nchunks);  // stop handing out work
                return;
            }
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(workers - 1));
    for (int t = 1; t < workers; ++t) pool.emplace_back(run);
    run();
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
}

}  // namespace ql
