// std::vector storage for the lattice's large arrays: 64-byte aligned (value rows start on
// cache-line and SIMD boundaries) and default-initialised, so that resize() does not zero
// memory that the next loop overwrites anyway.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace wsss {

template <typename T>
struct UninitAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};

  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) {}

  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlignment); }

  // Default-initialise: no zeroing for arithmetic types (explicit values still construct).
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(static_cast<Args&&>(args)...);
  }

  template <typename U>
  bool operator==(const UninitAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const UninitAllocator<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, UninitAllocator<T>>;

}  // namespace wsss
