// The free blocks of a PagedKVCache's pool, and where a sequence's next block goes.
//
// A decode step reads each sequence's blocks in order, and the hardware prefetchers
// follow memory front to back: when a sequence's blocks lie side by side in the pool its
// keys and values stream as one run, and when they are scattered every block restarts
// the prefetchers (docs/design.md, "A paged cache keeps a sequence's blocks side by side").
// So a sequence's next block is the one right after its last block when that one is
// free; otherwise, and for a sequence's first block, the middle of the longest free run
// (its start at the pool's start), which leaves the sequence ending just before that run
// room to grow, and the new one as much.
#pragma once

#include <cstdint>
#include <vector>

#include "attnforge/tensor.hpp"

namespace attnforge::detail {

class FreeBlocks {
 public:
  // Blocks [0, n_blocks), all free.
  explicit FreeBlocks(Index n_blocks)
      : bits_(static_cast<std::size_t>((n_blocks + kWordBits - 1) / kWordBits), ~Word{0}),
        n_blocks_(n_blocks),
        count_(n_blocks) {
    // Bits past the last block read as taken, so a whole word of ones is 64 free blocks.
    if (n_blocks % kWordBits != 0) bits_.back() = (Word{1} << (n_blocks % kWordBits)) - 1;
  }

  Index count() const { return count_; }
  bool is_free(Index block) const {
    return (bits_[word_of(block)] >> (block % kWordBits) & 1) != 0;
  }

  // Takes a free block (count() > 0) for a sequence whose last block is `after` (-1: it
  // has none).
  Index take(Index after) {
    const Index block = after >= 0 && after + 1 < n_blocks_ && is_free(after + 1)
                            ? after + 1
                            : middle_of_longest_run();
    bits_[word_of(block)] &= ~(Word{1} << (block % kWordBits));
    --count_;
    return block;
  }

  void release(Index block) {
    bits_[word_of(block)] |= Word{1} << (block % kWordBits);
    ++count_;
  }

 private:
  using Word = std::uint64_t;
  static constexpr Index kWordBits = 64;

  static std::size_t word_of(Index block) { return static_cast<std::size_t>(block / kWordBits); }

  // One pass over the bits, a word at a time where a word is all free or all taken.
  Index middle_of_longest_run() const {
    Index best_first = 0, best_length = 0, first = 0, length = 0;
    const auto close_run = [&] {
      if (length > best_length) best_first = first, best_length = length;
      length = 0;
    };
    for (std::size_t w = 0; w < bits_.size(); ++w) {
      const Word word = bits_[w];
      const Index base = static_cast<Index>(w) * kWordBits;
      if (word == 0) {
        close_run();
      } else if (word == ~Word{0}) {
        if (length == 0) first = base;
        length += kWordBits;
      } else {
        for (Index i = 0; i < kWordBits; ++i) {
          if ((word >> i & 1) == 0) {
            close_run();
          } else {
            if (length == 0) first = base + i;
            ++length;
          }
        }
      }
    }
    close_run();
    return best_first == 0 ? 0 : best_first + best_length / 2;
  }

  std::vector<Word> bits_;  // bit b of word b / 64: block b is free
  Index n_blocks_;
  Index count_;
};

}  // namespace attnforge::detail
