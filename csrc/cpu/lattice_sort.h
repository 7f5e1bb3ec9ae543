// Sorting helpers of the CPU lattice build (lattice_build.h): packing a vertex key (its first d
// lattice coordinates) into one 64-bit integer, a stable LSD radix sort of such keys shared
// among an OpenMP team, and a team-wide exclusive scan.
//
// Why sort instead of hashing: sorting the N(d+1) (key, entry) pairs gives, in a few streaming
// passes, the vertices (runs of equal keys), the points of each vertex in point order (the
// splat's gather lists), and the blur neighbours: adding the same offset to every key keeps the
// order, so the neighbours along one lattice direction are found by one merge walk of the
// sorted keys against themselves. A hash table does the same with one cache miss per lookup.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lattice_embed.h"
#include "parallel.h"

namespace wsss {

// Bit fields of a packed key: coordinate c is stored as (key_c - bias_c) << shift_c, coordinate 0
// in the highest field so that packed order is lexicographic order. A field spans the range of
// the points' remainder-0 coordinate widened by 2(d+1) on both sides: a vertex lies within d of
// it and a blur neighbour a further 1 or d away, so those pack without overflow, packing is
// linear, and a neighbour's packed key is the vertex's plus a fixed (wrapping) delta.
struct KeyPacking {
  int d = 0;
  int bits = 0;  // total bits used
  int64_t bias[kMaxFeatureDim] = {};
  int shift[kMaxFeatureDim] = {};

  // From the range [lo_c, hi_c] of the remainder-0 coordinates of all points; false if the
  // fields need more than 63 bits (then the caller sorts unpacked keys).
  bool init(int dim, const int64_t* lo, const int64_t* hi) {
    d = dim;
    const int64_t margin = 2 * (dim + 1);  // vertex: ±d from rem0; neighbour: ±d more
    int total = 0;
    int width[kMaxFeatureDim];
    for (int c = 0; c < dim; ++c) {
      bias[c] = lo[c] - margin;
      const uint64_t span = static_cast<uint64_t>(hi[c] - lo[c] + 2 * margin) + 1;
      int w = 1;
      while (w < 63 && (uint64_t(1) << w) < span) ++w;
      width[c] = w;
      total += w;
    }
    if (total > 63) return false;
    bits = total;
    int s = 0;
    for (int c = dim - 1; c >= 0; --c) {
      shift[c] = s;
      s += width[c];
    }
    return true;
  }

  // The packed keys of the d+1 vertices of a simplex (SPEC §6.2 "Vertices": coordinate c of
  // the remainder-k vertex is rem0_c + k, minus d+1 once rank_c > d-k). Incremental: from k-1
  // to k every coordinate gains 1, and the one of rank d-k+1 loses d+1.
  void pack_simplex(const int32_t* rem0, const int32_t* rank, uint64_t* out) const {
    int by_rank[kMaxFeatureDim + 1];
    for (int c = 0; c <= d; ++c) by_rank[rank[c]] = c;
    uint64_t ones = 0, p = 0;
    for (int c = 0; c < d; ++c) {
      ones += uint64_t(1) << shift[c];
      p += static_cast<uint64_t>(rem0[c] - bias[c]) << shift[c];
    }
    out[0] = p;
    for (int k = 1; k <= d; ++k) {
      p += ones;
      const int c = by_rank[d - k + 1];
      if (c < d) p -= static_cast<uint64_t>(d + 1) << shift[c];
      out[k] = p;
    }
  }

  // Packed offset of a key change (a signed value, applied with wrap-around arithmetic).
  uint64_t delta(const int32_t* change) const {
    uint64_t p = 0;
    for (int c = 0; c < d; ++c) p += static_cast<uint64_t>(static_cast<int64_t>(change[c])) << shift[c];
    return p;
  }
};

// Exclusive prefix sum of per-thread totals, called by every thread of the team with its own
// total; returns the sum of the totals of lower-ranked threads and sets `all` to the grand total.
// `scratch` must hold team_size() + 1 entries and be shared by the team.
inline int64_t team_exclusive_scan(int64_t mine, int64_t* scratch, int64_t& all) {
  const int t = team_rank(), nt = team_size();
  scratch[t + 1] = mine;
  team_barrier();
  int64_t before = 0;
  for (int u = 0; u < t; ++u) before += scratch[u + 1];
  all = 0;
  for (int u = 0; u < nt; ++u) all += scratch[u + 1];
  team_barrier();  // scratch may be reused right after
  return before;
}

// Stable LSD radix sort of keys (the low `bits` bits used) with a payload each (order), shared
// by the team: on return keys/order hold the sorted keys and their payloads, equal keys in input
// order. tmp_keys/tmp_order are scratch of n entries. Every thread of the team calls it and
// counts and moves its static share of each pass; the result, a stable sort, does not depend on
// the team size.
struct TeamRadixSort {
  static constexpr int kMaxDigitBits = 12;

  std::vector<int64_t> hist;  // (team size) x (buckets)

  void sort(uint64_t* keys, int32_t* order, uint64_t* tmp_keys, int32_t* tmp_order, int64_t n, int bits) {
    const int passes = std::max(1, (bits + kMaxDigitBits - 1) / kMaxDigitBits);
    const int digit_bits = std::max(1, (bits + passes - 1) / passes);
    const int64_t buckets = int64_t(1) << digit_bits;
    const int nt = team_size(), t = team_rank();
    team_single([&] { hist.assign(static_cast<size_t>(nt) * buckets, 0); });
    int64_t b0, b1;
    team_range(n, b0, b1);
    uint64_t* src_k = keys;
    int32_t* src_o = order;
    uint64_t* dst_k = tmp_keys;
    int32_t* dst_o = tmp_order;
    int64_t* h = hist.data() + static_cast<size_t>(t) * buckets;
    for (int p = 0; p < passes; ++p) {
      const int shift = p * digit_bits;
      const uint64_t mask = static_cast<uint64_t>(buckets - 1);
      std::fill(h, h + buckets, 0);
      for (int64_t i = b0; i < b1; ++i) ++h[(src_k[i] >> shift) & mask];
      team_barrier();
      team_single([&] {  // bucket-major, then thread: a stable global order
        int64_t run = 0;
        for (int64_t b = 0; b < buckets; ++b)
          for (int u = 0; u < nt; ++u) {
            const int64_t c = hist[static_cast<size_t>(u) * buckets + b];
            hist[static_cast<size_t>(u) * buckets + b] = run;
            run += c;
          }
      });
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t pos = h[(src_k[i] >> shift) & mask]++;
        dst_k[pos] = src_k[i];
        dst_o[pos] = src_o[i];
      }
      team_barrier();
      std::swap(src_k, dst_k);
      std::swap(src_o, dst_o);
    }
    if (src_k != keys) {  // an odd number of passes: copy back
      std::copy(src_k + b0, src_k + b1, keys + b0);
      std::copy(src_o + b0, src_o + b1, order + b0);
      team_barrier();
    }
  }
};

}  // namespace wsss
