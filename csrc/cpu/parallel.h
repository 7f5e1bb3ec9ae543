// OpenMP helpers with an explicit thread count (0 = torch's intra-op setting), so that callers
// running several images on Python threads can keep the total at the core count.
//
// Two styles:
// - parallel_chunks(n, grain, threads, f): one fork/join around a loop;
// - team_region(threads, f) + team_for / team_range / team_single / team_barrier: one parallel
//   region in which every thread runs f, and the helpers share loops among the team. The helpers
//   are orphaned OpenMP constructs, so the same code also runs serially outside a region (the
//   team is then one thread). Used by the dense CRF, whose mean-field loop has a dozen loops per
//   iteration: one region with barriers instead of a fork/join per loop.
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

// Runs f() on every thread of a new team of `num_threads`. Inside another parallel region (or
// with num_threads 1) the team is the calling thread alone, so the team helpers in f never bind
// to an enclosing team. f must not throw: check inputs before.
template <typename F>
void team_region(int num_threads, const F& f) {
#ifdef _OPENMP
  const int threads = omp_in_parallel() ? 1 : std::max(num_threads, 1);
#pragma omp parallel num_threads(threads)
  f();
#else
  f();
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int team_rank() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Every thread of the team calls this; f(begin, end) runs on chunks of `chunk` items of [0, n),
// handed out dynamically (a thread the OS preempts does not hold up the others for its static
// share). Ends with a barrier. Results must not depend on which thread runs which chunk.
template <typename F>
void team_for(int64_t n, int64_t chunk, const F& f) {
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t count = (n + chunk - 1) / chunk;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
  for (int64_t c = 0; c < count; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
}

// This thread's static share of [0, n) (for scans whose parts must be known in advance).
inline void team_range(int64_t n, int64_t& begin, int64_t& end) {
  const int64_t t = team_rank(), nt = team_size();
  begin = n * t / nt;
  end = n * (t + 1) / nt;
}

// f() on one thread of the team, then a barrier.
template <typename F>
void team_single(const F& f) {
#ifdef _OPENMP
#pragma omp single
#endif
  f();
}

}  // namespace wsss
