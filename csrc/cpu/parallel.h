// A minimal OpenMP loop helper with an explicit thread count (0 = torch's intra-op setting),
// so that callers running several images on Python threads can keep the total at the core count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace wsss {

inline int resolve_num_threads(int64_t requested) {
  return requested > 0 ? static_cast<int>(requested) : at::get_num_threads();
}

// Calls f(begin, end) on contiguous chunks of [0, n); chunks of at least `grain` items.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, int num_threads, const F& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(grain, 1));
  const int threads = static_cast<int>(std::min<int64_t>(num_threads, max_chunks));
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num();
      const int64_t nt = omp_get_num_threads();
      const int64_t begin = n * t / nt;
      const int64_t end = n * (t + 1) / nt;
      if (begin < end) f(begin, end);
    }
    return;
  }
#endif
  f(0, n);
}

}  // namespace wsss
