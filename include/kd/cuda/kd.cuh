// kd/cuda/kd.cuh: the CUDA backend. Include from a .cu file; losses are then callable with a
// kd::cuda::backend{&context} in place of kd::cpu.
#pragma once

#include <kd/kd.hpp>
#include <kd/cuda/context.cuh>
#include <kd/cuda/logit_kd.cuh>
#include <kd/cuda/cross_entropy.cuh>
#include <kd/cuda/linear_kd.cuh>
#include <kd/cuda/feature.cuh>
#include <kd/cuda/moe.cuh>
#include <kd/cuda/attention.cuh>
