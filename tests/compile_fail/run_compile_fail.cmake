# Driver for one compile-fail test (run by ctest via `cmake -P`):
#   -DKD_BUILD_DIR=<build tree> -DKD_TARGET=<target> -DKD_SOURCE=<the .cpp> [-DKD_CONFIG=<cfg>]
# Passes only if building KD_TARGET fails AND the build output matches the regex taken from the
# source's first line, `// expect: <regex>` (CMake regex syntax, matched against the whole output).
cmake_minimum_required(VERSION 3.25)

foreach(_v KD_BUILD_DIR KD_TARGET KD_SOURCE)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "run_compile_fail.cmake: -D${_v}=... is required")
  endif()
endforeach()

file(READ "${KD_SOURCE}" _head LIMIT 1024)
if(NOT _head MATCHES "^// expect: ([^\r\n]+)")
  message(FATAL_ERROR "${KD_SOURCE}: the first line must be `// expect: <regex>`")
endif()
string(STRIP "${CMAKE_MATCH_1}" _re)

set(_cfg)
if(KD_CONFIG)
  set(_cfg --config "${KD_CONFIG}")
endif()

set(ENV{LC_ALL} C)  # plain ASCII quotes in GCC diagnostics
execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${KD_BUILD_DIR}" --target "${KD_TARGET}" ${_cfg}
  RESULT_VARIABLE _rc
  OUTPUT_VARIABLE _out
  ERROR_VARIABLE _out)

if(_rc EQUAL 0)
  message(FATAL_ERROR "${KD_TARGET}: compiled successfully, but it must fail with output matching\n  ${_re}\nBuild output:\n${_out}")
endif()
if(NOT _out MATCHES "${_re}")
  message(FATAL_ERROR "${KD_TARGET}: failed to compile as expected, but no output matches\n  ${_re}\nBuild output:\n${_out}")
endif()
message(STATUS "${KD_TARGET}: failed to compile as expected (matched \"${_re}\")")
