// kd/policy/precision.hpp: precision policies.
//
// A precision policy names a storage type (what tensors hold) and an accumulation type (what sums and
// exponentials are computed in). Teacher, student and projection precisions are named separately, so
// a teacher in fp16 feeding an fp32 projection is something the user states, and a tensor whose
// element type disagrees with its declared precision fails to compile (the seed run's
// "mat1 and mat2 must have the same dtype (Half and Float)" crash, moved to compile time).
#pragma once

#include <concepts>
#include <type_traits>

#include <kd/core/numeric.hpp>

namespace kd {

template <class Storage, class Accum>
struct precision {
  static_assert(is_storage_type_v<Storage>, "kd::precision storage must be float, double, kd::half or kd::bfloat16.");
  static_assert(std::is_floating_point_v<Accum>, "kd::precision accumulation type must be float or double.");
  static_assert(sizeof(Accum) >= sizeof(float), "kd::precision accumulates in float or wider.");
  using storage_type = Storage;
  using accum_type = Accum;
};

using fp32 = precision<float, float>;
using fp16 = precision<half, float>;
using bf16 = precision<bfloat16, float>;
using fp64 = precision<double, double>;  // the reference precision for gradient checks

template <class P>
concept Precision = requires {
  typename P::storage_type;
  typename P::accum_type;
} && is_storage_type_v<typename P::storage_type> && std::is_floating_point_v<typename P::accum_type>;

static_assert(Precision<fp32> && Precision<fp16> && Precision<bf16> && Precision<fp64>);
static_assert(!Precision<float>);

// The precisions of one distillation pair. The projection (student -> teacher hidden) has its own.
template <Precision Teacher, Precision Student, Precision Projection = Student>
struct precision_set {
  using teacher = Teacher;
  using student = Student;
  using projection = Projection;
};

template <class S>
concept PrecisionSet = requires {
  typename S::teacher;
  typename S::student;
  typename S::projection;
} && Precision<typename S::teacher> && Precision<typename S::student> && Precision<typename S::projection>;

static_assert(PrecisionSet<precision_set<fp16, fp32>>);
static_assert(!PrecisionSet<fp32>);

// The accumulation type used when precisions meet: the widest of their accumulation types.
template <Precision... Ps>
using common_accum_t = std::common_type_t<typename Ps::accum_type...>;
static_assert(std::is_same_v<common_accum_t<fp16, fp32>, float> && std::is_same_v<common_accum_t<bf16, fp64>, double>);

namespace detail {
template <class Expected, class Given>
inline constexpr bool storage_matches_v = std::is_same_v<std::remove_cv_t<Given>, Expected>;
}  // namespace detail

}  // namespace kd

// The dtype checks every loss performs on its tensors. One sentence each, naming the tensor's role.
// PrecisionT is written without `typename` (e.g. P::teacher).
#define KD_CHECK_TEACHER_DTYPE(PrecisionT, T)                                                        \
  static_assert(::kd::detail::storage_matches_v<typename PrecisionT::storage_type, T>,              \
                "kd: the teacher tensor's element type does not match the teacher precision policy.")
#define KD_CHECK_STUDENT_DTYPE(PrecisionT, T)                                                        \
  static_assert(::kd::detail::storage_matches_v<typename PrecisionT::storage_type, T>,              \
                "kd: the student tensor's element type does not match the student precision policy.")
#define KD_CHECK_PROJECTION_DTYPE(PrecisionT, T)                                                     \
  static_assert(::kd::detail::storage_matches_v<typename PrecisionT::storage_type, T>,              \
                "kd: the projection tensor's element type does not match the projection precision policy.")
#define KD_CHECK_GRAD_DTYPE(PrecisionT, T)                                                           \
  static_assert(::kd::detail::storage_matches_v<typename PrecisionT::storage_type, T>,              \
                "kd: a gradient tensor's element type does not match the precision policy it belongs to.")

namespace kd::detail {
// The accumulation type a loss over a precision_set computes in: the widest of its members.
template <class S>
using common_accum_for = common_accum_t<typename S::teacher, typename S::student, typename S::projection>;
}  // namespace kd::detail
