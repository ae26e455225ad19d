// expect: static assertion failed: kd compile-fail self check
// Self-test of the compile-fail machinery; deliberately independent of the kd headers.
template <class>
inline constexpr bool false_v = false;

static_assert(false_v<int>, "kd compile-fail self check");
