// attnforge: grouped-query attention with RoPE, a KV cache and fused SDPA on the CPU.
#pragma once

#include "attnforge/attention.hpp"
#include "attnforge/kv_cache.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/norm.hpp"
#include "attnforge/paged_attention.hpp"
#include "attnforge/paged_kv_cache.hpp"
#include "attnforge/parameter.hpp"
#include "attnforge/qint8.hpp"
#include "attnforge/rope.hpp"
#include "attnforge/sdpa.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"
