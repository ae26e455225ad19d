// kd/kd.cuh: the CUDA backend. Include from a .cu file; losses are then callable with a
// kd::cuda::backend{&context} in place of kd::cpu.
#pragma once

#include <kd/kd.hpp>
#include <kd/cuda/context.cuh>
#include <kd/loss/logit_kd.cuh>
#include <kd/loss/cross_entropy.cuh>
#include <kd/loss/linear_kd.cuh>
#include <kd/loss/feature.cuh>
#include <kd/loss/moe.cuh>
#include <kd/loss/attention.cuh>
#include <kd/train/adamw.cuh>
