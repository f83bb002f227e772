// Everything of the optional MPI component (target attnforge::mpi).
#pragma once

#include "attnforge/mpi/lse_merge.hpp"
#include "attnforge/mpi/ring_attention.hpp"
#include "attnforge/mpi/sharded_decode.hpp"
#include "attnforge/mpi/tensor_parallel.hpp"
#include "attnforge/mpi/zigzag.hpp"
