// kd/kd.hpp: everything in kd's core (CPU reference backend). CUDA headers live in kd/cuda/.
#pragma once

#include <kd/core/version.hpp>
#include <kd/core/status.hpp>
#include <kd/core/numeric.hpp>
#include <kd/core/tensor.hpp>
#include <kd/core/rng.hpp>
#include <kd/policy/backend.hpp>
#include <kd/policy/precision.hpp>
#include <kd/policy/normalization.hpp>
#include <kd/policy/curriculum.hpp>
#include <kd/policy/logging.hpp>
#include <kd/loss/common.hpp>
#include <kd/loss/divergence.hpp>
#include <kd/loss/logit_kd.hpp>
#include <kd/loss/linear_kd.hpp>
#include <kd/loss/cross_entropy.hpp>
#include <kd/loss/feature.hpp>
#include <kd/loss/attention.hpp>
#include <kd/loss/moe.hpp>
#include <kd/loss/vocab_map.hpp>
#include <kd/train/objective.hpp>
#include <kd/train/early_stopping.hpp>
#include <kd/train/loss_scaler.hpp>
#include <kd/train/finite_guard.hpp>
#include <kd/train/adamw.hpp>
#include <kd/train/interrupt.hpp>
