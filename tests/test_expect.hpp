// GoogleTest expectations shared by the test files: a call that must throw a given
// exception whose message names what went wrong, and a KVCache that a rejected call
// must leave exactly as it was.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "attnforge/attnforge.hpp"
#include "test_util.hpp"

namespace attnforge::test {

// `call()` must throw Exception, and its message must contain every fragment.
template <typename Exception, typename F>
void expect_throws(F&& call, const std::vector<std::string>& fragments) {
  try {
    call();
    ADD_FAILURE() << "expected an exception containing \""
                  << (fragments.empty() ? "" : fragments[0]) << "\"";
  } catch (const Exception& e) {
    for (const std::string& f : fragments) EXPECT_THAT(e.what(), ::testing::HasSubstr(f));
  }
}

template <typename F>
void expect_invalid(F&& call, const std::vector<std::string>& fragments) {
  expect_throws<std::invalid_argument>(call, fragments);
}

// Everything a KVCache holds: length, key and value storage, recorded document ids.
template <typename T>
struct CacheSnapshot {
  explicit CacheSnapshot(const KVCache<T>& cache)
      : seq_len(cache.seq_len()),
        keys(cache.key_storage()),
        values(cache.value_storage()),
        ids(cache.doc_id_storage()) {}
  Index seq_len;
  Tensor<T, 4> keys, values;
  Tensor<DocId, 2> ids;
};

template <typename T>
void expect_cache_unchanged(const KVCache<T>& cache, const CacheSnapshot<T>& before) {
  EXPECT_EQ(cache.seq_len(), before.seq_len);
  EXPECT_TRUE(bitwise_equal(cache.key_storage(), before.keys));
  EXPECT_TRUE(bitwise_equal(cache.value_storage(), before.values));
  EXPECT_TRUE(bitwise_equal(cache.doc_id_storage(), before.ids));
}

// `call()` must throw Exception naming every fragment and leave `cache` untouched.
template <typename Exception, typename T, typename F>
void expect_rejected(KVCache<T>& cache, F&& call, const std::vector<std::string>& fragments) {
  const CacheSnapshot<T> before(cache);
  expect_throws<Exception>(call, fragments);
  expect_cache_unchanged(cache, before);
}

}  // namespace attnforge::test
