// Construction of the CPU permutohedral lattice (SPEC §6.2), shared by an OpenMP team.
//
// Steps (each a team loop or a scan):
// 1. embed every point: its enclosing simplex (remainder-0 point, ranks) and barycentric weights;
// 2. runs of consecutive points in the same simplex (common in smooth images) are represented
//    by their first point, so the steps below handle each simplex once;
// 3. the vertex keys of the representatives' corners are packed into 64-bit integers
//    (lattice_sort.h) and radix-sorted; runs of equal keys are the vertices;
// 4. vertices are numbered in the order the points first reach them, so nearby points use
//    nearby vertex rows;
// 5. each vertex gets its list of (point, weight) entries in point order: the splat is then a
//    gather, without atomics or per-thread copies, and its sums do not depend on the threads;
// 6. blur neighbours: a merge walk of the sorted keys against themselves shifted by one lattice
//    step (adding a constant keeps the order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "lattice_buffer.h"
#include "lattice_kernels.h"
#include "lattice_sort.h"
#include "parallel.h"

namespace wsss {

// Items per dynamically scheduled chunk of the lattice loops: enough work per chunk to hide the
// scheduling cost, and enough chunks for balance.
constexpr int64_t kRowsPerChunk = 1024;

// What the filters need from a built lattice.
template <typename scalar_t>
struct LatticeStructure {
  int d = 0;
  int64_t n = 0;  // points
  int64_t m = 0;  // vertices
  Buffer<int32_t> vertex;         // n x (d+1): vertex id of each simplex corner
  Buffer<scalar_t> weight;        // n x (d+1): barycentric weights
  Buffer<int32_t> splat_offset;   // m + 1
  Buffer<int32_t> splat_point;    // n (d+1), grouped by vertex, points in order
  Buffer<scalar_t> splat_weight;  // n (d+1), the barycentric weight of each of those entries
  Buffer<int32_t> neighbors;      // (d+1) x m x 2: blur neighbours, m = missing (a zero row)
};

// Largest number of points a lattice takes: an entry (representative point, corner) is tagged
// as point << 5 | corner in one int32.
constexpr int kCornerBits = 5;
constexpr int64_t kMaxLatticePoints = int64_t(1) << (31 - kCornerBits);
static_assert(kMaxFeatureDim + 1 <= (1 << kCornerBits), "a corner index must fit in kCornerBits");

template <typename scalar_t>
class LatticeBuilder {
  using Kernels = LatticeKernels<scalar_t>;

 public:
  // Team call. features: n x d row-major, 1 <= n <= kMaxLatticePoints, 1 <= d <= kMaxFeatureDim
  // (checked by callers).
  void build(const scalar_t* features, int64_t n, int d, LatticeStructure<scalar_t>& out) {
    team_single([&] { start(n, d, out); });
    team_for(n, kRowsPerChunk, [&](int64_t i0, int64_t i1) {
      Kernels::embed(features, d, scale_, rem0_.data(), rank_.data(), out.weight.data(), i0, i1);
      update_ranges(i0, i1);
    });
    find_runs();
    choose_packing();
    const int d1 = d + 1;
    if (packed_) {
      team_for(runs_, kRowsPerChunk, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = run_start_[r];
          packing_.pack_simplex(&rem0_[i * d1], &rank_[i * d1], &keys_[r * d1]);
          for (int k = 0; k <= d; ++k) order_[r * d1 + k] = tag(r, k);
        }
      });
      radix_.sort(keys_.data(), order_.data(), tmp_keys_.data(), tmp_order_.data(), runs_ * d1, packing_.bits);
    } else {
      team_single([&] { sort_unpacked(); });
    }
    find_vertices(out);
    number_vertices();
    fill_entries(out);
    find_neighbors(out);
    team_single([&] { release(); });
  }

 private:
  void start(int64_t n, int d, LatticeStructure<scalar_t>& out) {
    d_ = d;
    n_ = n;
    const int d1 = d + 1;
    for (int j = 0; j < d; ++j)  // SPEC §6.2 "Elevate"
      scale_[j] = std::sqrt(scalar_t(2) / scalar_t(3)) * scalar_t(d1) / std::sqrt(scalar_t((j + 1) * (j + 2)));
    out.d = d;
    out.n = n;
    out.weight.resize(n * d1);
    out.vertex.resize(n * d1);
    rem0_.resize(n * d1);
    rank_.resize(n * d1);
    range_.resize(static_cast<size_t>(team_size()) * 2 * d);
    for (size_t t = 0; t < range_.size(); t += 2 * d)
      for (int c = 0; c < d; ++c) {
        range_[t + c] = INT32_MAX;
        range_[t + d + c] = INT32_MIN;
      }
    scan_.assign(team_size() + 1, 0);
  }

  // Entries (run r, corner k) travel through the sort as tags; entry_of gives their position
  // in run-major order (without a division by d+1).
  static int32_t tag(int64_t r, int k) { return static_cast<int32_t>(r << kCornerBits) | k; }
  static int64_t run_of(int32_t t) { return t >> kCornerBits; }
  static int corner_of(int32_t t) { return t & ((1 << kCornerBits) - 1); }
  int64_t entry_of(int32_t t) const { return run_of(t) * (d_ + 1) + corner_of(t); }

  // SPEC §6.2 "Vertices": the first d coordinates of the remainder-k vertex of point i.
  void vertex_key(int64_t i, int k, int32_t* key) const {
    const int d1 = d_ + 1;
    const int32_t* rem0 = &rem0_[i * d1];
    const int32_t* rank = &rank_[i * d1];
    for (int c = 0; c < d_; ++c) key[c] = rem0[c] + (rank[c] <= d_ - k ? k : k - d1);
  }

  // This thread's range of each remainder-0 coordinate, over points [i0, i1).
  void update_ranges(int64_t i0, int64_t i1) {
    const int d = d_, d1 = d + 1;
    int32_t lo[kMaxFeatureDim], hi[kMaxFeatureDim];
    for (int c = 0; c < d; ++c) lo[c] = hi[c] = rem0_[i0 * d1 + c];
    for (int64_t i = i0 + 1; i < i1; ++i)
      for (int c = 0; c < d; ++c) {
        lo[c] = std::min(lo[c], rem0_[i * d1 + c]);
        hi[c] = std::max(hi[c], rem0_[i * d1 + c]);
      }
    int64_t* mine = &range_[static_cast<size_t>(team_rank()) * 2 * d];
    for (int c = 0; c < d; ++c) {
      mine[c] = std::min<int64_t>(mine[c], lo[c]);
      mine[d + c] = std::max<int64_t>(mine[d + c], hi[c]);
    }
  }

  bool same_simplex(int64_t a, int64_t b) const {
    const int d1 = d_ + 1;
    for (int c = 0; c < d1; ++c)
      if (rem0_[a * d1 + c] != rem0_[b * d1 + c] || rank_[a * d1 + c] != rank_[b * d1 + c]) return false;
    return true;
  }

  // run_start_: the first point of every run of consecutive points in one simplex, then n.
  void find_runs() {
    int64_t i0, i1;
    team_range(n_, i0, i1);
    int64_t mine = 0;
    for (int64_t i = i0; i < i1; ++i) mine += i == 0 || !same_simplex(i, i - 1);
    int64_t total;
    int64_t r = team_exclusive_scan(mine, scan_.data(), total);
    team_single([&] {
      runs_ = total;
      run_start_.resize(total + 1);
      run_start_[total] = static_cast<int32_t>(n_);
    });
    for (int64_t i = i0; i < i1; ++i)
      if (i == 0 || !same_simplex(i, i - 1)) run_start_[r++] = static_cast<int32_t>(i);
    team_barrier();
  }

  // The packing of the keys (if 63 bits suffice) from the ranges of all threads.
  void choose_packing() {
    team_single([&] {
      const int d = d_;
      int64_t lo[kMaxFeatureDim], hi[kMaxFeatureDim];
      for (int c = 0; c < d; ++c) {
        lo[c] = INT32_MAX;
        hi[c] = INT32_MIN;
      }
      for (size_t t = 0; t < range_.size(); t += 2 * d)
        for (int c = 0; c < d; ++c) {
          lo[c] = std::min(lo[c], range_[t + c]);
          hi[c] = std::max(hi[c], range_[t + d + c]);
        }
      packed_ = packing_.init(d, lo, hi);
      const int64_t entries = runs_ * (d + 1);
      order_.resize(entries);
      if (packed_) {
        keys_.resize(entries);
        tmp_keys_.resize(entries);
        tmp_order_.resize(entries);
      }
    });
  }

  // Features too spread out (or too many dimensions) for 64-bit keys: sort the key tuples.
  void sort_unpacked() {
    const int d = d_, d1 = d + 1;
    const int64_t entries = runs_ * d1;
    unpacked_.resize(entries * d);
    for (int64_t r = 0; r < runs_; ++r)
      for (int k = 0; k <= d; ++k) {
        vertex_key(run_start_[r], k, &unpacked_[(r * d1 + k) * d]);
        order_[r * d1 + k] = tag(r, k);
      }
    std::stable_sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) {
      return std::lexicographical_compare(unpacked_key(a), unpacked_key(a) + d_, unpacked_key(b),
                                          unpacked_key(b) + d_);
    });
  }

  // The key tuple of the entry tagged t.
  const int32_t* unpacked_key(int32_t t) const { return &unpacked_[static_cast<size_t>(entry_of(t)) * d_]; }

  // Sorted position s starts a new vertex.
  bool group_head(int64_t s) const {
    if (s == 0) return true;
    if (packed_) return keys_[s] != keys_[s - 1];
    return !std::equal(unpacked_key(order_[s]), unpacked_key(order_[s]) + d_, unpacked_key(order_[s - 1]));
  }

  // Vertices = runs of equal keys in sorted order: group_start_ and out.m.
  void find_vertices(LatticeStructure<scalar_t>& out) {
    const int64_t entries = runs_ * (d_ + 1);
    int64_t s0, s1;
    team_range(entries, s0, s1);
    int64_t heads = 0;
    for (int64_t s = s0; s < s1; ++s) heads += group_head(s);
    int64_t total;
    int64_t u = team_exclusive_scan(heads, scan_.data(), total);
    team_single([&] {
      out.m = m_ = total;
      group_start_.resize(total + 1);
      group_start_[total] = static_cast<int32_t>(entries);
    });
    for (int64_t s = s0; s < s1; ++s)
      if (group_head(s)) group_start_[u++] = static_cast<int32_t>(s);
    team_barrier();
  }

  // Vertex ids in the order of each vertex's first entry (entries are in point order): flag the
  // first entry of every vertex (its smallest, since the sort is stable), then a scan.
  void number_vertices() {
    const int64_t entries = runs_ * (d_ + 1);
    team_single([&] {
      first_id_.assign(entries, -1);
      id_.resize(m_);
    });
    team_for(m_, 16 * kRowsPerChunk, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) first_id_[entry_of(order_[group_start_[u]])] = 0;
    });
    int64_t e0, e1;
    team_range(entries, e0, e1);
    int64_t firsts = 0;
    for (int64_t e = e0; e < e1; ++e) firsts += first_id_[e] == 0;
    int64_t total;
    int64_t next = team_exclusive_scan(firsts, scan_.data(), total);
    for (int64_t e = e0; e < e1; ++e)
      if (first_id_[e] == 0) first_id_[e] = static_cast<int32_t>(next++);
    team_barrier();
    team_for(m_, 16 * kRowsPerChunk, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) id_[u] = first_id_[entry_of(order_[group_start_[u]])];
    });
  }

  // out.vertex of every (point, corner) and the splat lists. A vertex's entries come in sorted
  // order, i.e. by run, and each run expands to its points in order: points stay in order.
  void fill_entries(LatticeStructure<scalar_t>& out) {
    const int d1 = d_ + 1;
    team_single([&] {
      out.splat_offset.assign(m_ + 1, 0);
      out.splat_point.resize(n_ * d1);
      out.splat_weight.resize(n_ * d1);
    });
    const auto run_length = [&](int64_t s) {
      const int64_t r = run_of(order_[s]);
      return run_start_[r + 1] - run_start_[r];
    };
    team_for(m_, 4 * kRowsPerChunk, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        int32_t count = 0;
        for (int64_t s = group_start_[u]; s < group_start_[u + 1]; ++s) count += run_length(s);
        out.splat_offset[id_[u] + 1] = count;
      }
    });
    int64_t v0, v1;
    team_range(m_, v0, v1);
    int64_t mine = 0;
    for (int64_t v = v0; v < v1; ++v) mine += out.splat_offset[v + 1];
    int64_t total;
    int64_t run = team_exclusive_scan(mine, scan_.data(), total);
    for (int64_t v = v0; v < v1; ++v) {
      run += out.splat_offset[v + 1];
      out.splat_offset[v + 1] = static_cast<int32_t>(run);
    }
    team_barrier();
    team_for(m_, kRowsPerChunk, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int32_t v = id_[u];
        int64_t pos = out.splat_offset[v];
        for (int64_t s = group_start_[u]; s < group_start_[u + 1]; ++s) {
          const int64_t r = run_of(order_[s]), k = corner_of(order_[s]);
          for (int64_t i = run_start_[r]; i < run_start_[r + 1]; ++i, ++pos) {
            out.vertex[i * d1 + k] = v;
            out.splat_point[pos] = static_cast<int32_t>(i);
            out.splat_weight[pos] = out.weight[i * d1 + k];
          }
        }
      }
    });
  }

  // Blur neighbours along each of the d+1 lattice directions (SPEC §6.2 "Blur"):
  // n1 = key - 1 + (d+1) e_j, n2 = key + 1 - (d+1) e_j (e_d is not among the d stored
  // coordinates); a missing vertex points to the zero row m.
  void find_neighbors(LatticeStructure<scalar_t>& out) {
    const int d = d_;
    team_single([&] { out.neighbors.resize(static_cast<size_t>(d + 1) * m_ * 2); });
    if (packed_)
      neighbors_packed(out.neighbors.data());
    else
      neighbors_unpacked(out.neighbors.data());
  }

  // One merge walk per direction and side, all 2(d+1) walks in one pass over this thread's
  // share of the sorted keys.
  void neighbors_packed(int32_t* neighbors) {
    const int d = d_, walks = 2 * (d + 1);
    const int32_t missing = static_cast<int32_t>(m_);
    int64_t u0, u1;
    team_range(m_, u0, u1);
    const auto key_of = [&](int64_t u) { return keys_[group_start_[u]]; };
    uint64_t offset[2 * (kMaxFeatureDim + 1)];
    int64_t p[2 * (kMaxFeatureDim + 1)];
    for (int j = 0; j <= d; ++j) {
      int32_t change[kMaxFeatureDim];
      for (int c = 0; c < d; ++c) change[c] = c == j ? d : -1;
      const uint64_t delta = packing_.delta(change);
      for (int side = 0; side < 2; ++side) {
        const int w = 2 * j + side;
        offset[w] = side == 0 ? delta : uint64_t(0) - delta;
        // The first vertex whose key is >= this thread's first target.
        const uint64_t first = u0 < u1 ? key_of(u0) + offset[w] : 0;
        int64_t lo = 0, hi = m_;
        while (lo < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (key_of(mid) < first)
            lo = mid + 1;
          else
            hi = mid;
        }
        p[w] = lo;
      }
    }
    for (int64_t u = u0; u < u1; ++u) {
      const uint64_t key = key_of(u);
      const size_t at = static_cast<size_t>(id_[u]) * 2;
      for (int w = 0; w < walks; ++w) {
        const uint64_t target = key + offset[w];
        int64_t q = p[w];
        while (q < m_ && key_of(q) < target) ++q;
        p[w] = q;
        neighbors[static_cast<size_t>(w / 2) * m_ * 2 + at + w % 2] =
            q < m_ && key_of(q) == target ? id_[q] : missing;
      }
    }
    team_barrier();
  }

  void neighbors_unpacked(int32_t* neighbors) {
    const int d = d_;
    const int32_t missing = static_cast<int32_t>(m_);
    const auto lookup = [&](const int32_t* key) {
      int64_t lo = 0, hi = m_;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        const int32_t* k = unpacked_key(order_[group_start_[mid]]);
        if (std::lexicographical_compare(k, k + d, key, key + d))
          lo = mid + 1;
        else
          hi = mid;
      }
      if (lo == m_) return missing;
      const int32_t* k = unpacked_key(order_[group_start_[lo]]);
      return std::equal(k, k + d, key) ? id_[lo] : missing;
    };
    team_for(m_, kRowsPerChunk, [&](int64_t u0, int64_t u1) {
      int32_t n1[kMaxFeatureDim], n2[kMaxFeatureDim];
      for (int64_t u = u0; u < u1; ++u) {
        const int32_t* k0 = unpacked_key(order_[group_start_[u]]);
        for (int j = 0; j <= d; ++j) {
          for (int c = 0; c < d; ++c) {
            n1[c] = k0[c] - 1;
            n2[c] = k0[c] + 1;
          }
          if (j < d) {
            n1[j] = k0[j] + d;
            n2[j] = k0[j] - d;
          }
          neighbors[(static_cast<size_t>(j) * m_ + id_[u]) * 2] = lookup(n1);
          neighbors[(static_cast<size_t>(j) * m_ + id_[u]) * 2 + 1] = lookup(n2);
        }
      }
    });
  }

  void release() {
    Buffer<int32_t>().swap(rem0_);
    Buffer<int32_t>().swap(rank_);
    Buffer<int32_t>().swap(run_start_);
    Buffer<uint64_t>().swap(keys_);
    Buffer<uint64_t>().swap(tmp_keys_);
    Buffer<int32_t>().swap(order_);
    Buffer<int32_t>().swap(tmp_order_);
    Buffer<int32_t>().swap(unpacked_);
    Buffer<int32_t>().swap(group_start_);
    Buffer<int32_t>().swap(first_id_);
    Buffer<int32_t>().swap(id_);
  }

  int d_ = 0;
  int64_t n_ = 0, m_ = 0, runs_ = 0;
  scalar_t scale_[kMaxFeatureDim] = {};
  Buffer<int32_t> rem0_, rank_;         // n x (d+1): remainder-0 point and ranks
  std::vector<int64_t> range_;          // per thread: lo[d], hi[d] of rem0
  std::vector<int64_t> scan_;           // team scan scratch
  Buffer<int32_t> run_start_;           // runs + 1
  bool packed_ = false;
  KeyPacking packing_;
  TeamRadixSort radix_;
  Buffer<uint64_t> keys_, tmp_keys_;    // runs (d+1) packed keys, sorted
  Buffer<int32_t> order_, tmp_order_;   // the entries' tags in key order
  Buffer<int32_t> unpacked_;            // runs (d+1) x d keys when they do not pack
  Buffer<int32_t> group_start_;         // m + 1: first sorted position of each vertex
  Buffer<int32_t> first_id_;            // runs (d+1): vertex id at each vertex's first entry
  Buffer<int32_t> id_;                  // m: vertex id of sorted group u
};

}  // namespace wsss
