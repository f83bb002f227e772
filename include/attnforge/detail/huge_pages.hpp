// Asks the OS to back a large, not yet touched allocation with huge pages.
//
// Decode streams a whole KV cache per token; a paged cache's decode reads its pool in many
// short runs (one per block and KV head) scattered over the pool, and on 4 KiB pages
// nearly every run starts on a page whose translation is not cached. Linux's transparent
// huge pages are often enabled only for memory that asks (`madvise` mode), hence the
// advice. It is advice: where the OS or the build has no such thing, or declines, nothing
// changes but speed.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace attnforge::detail {

inline void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kPage = 4096, kHugePage = std::uintptr_t{2} << 20;
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(data) + kPage - 1) & ~(kPage - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(data) + bytes) & ~(kPage - 1);
  if (end >= begin + kHugePage) {
    // The result is ignored on purpose: a refusal leaves ordinary pages, which work.
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace attnforge::detail
