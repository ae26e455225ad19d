# Checks kd's layering: each header under KD_INCLUDE_DIR/kd belongs to a layer by its path, and may
# include only headers of its own layer or of lower ones. Run: cmake -DKD_INCLUDE_DIR=<dir> -P <this>.
#   0 core      kd/core/             status, tensor views, numeric, rng, version
#   1 cuda      kd/cuda/             the CUDA runtime: context, storage, reductions, GEMM
#   2 policy    kd/policy/           precision, normalization, curriculum, logging cadence, backend tags
#   3 component kd/loss/ kd/model/ kd/io/ kd/text/   losses with their kernels, models, formats, text
#   4 train     kd/train/            objective, schedules in use, optimizer, data, checkpoints
#   5 umbrella  kd/kd.hpp kd/kd.cuh
# Every violation is listed, then the script fails once.
if(NOT KD_INCLUDE_DIR)
  message(FATAL_ERROR "check_layers.cmake: pass -DKD_INCLUDE_DIR=<include dir>")
endif()

get_filename_component(KD_INCLUDE_DIR "${KD_INCLUDE_DIR}" ABSOLUTE)
set(_names core cuda policy component train umbrella)

function(kd_layer_of rel out_rank)
  if(rel MATCHES "^kd/core/")
    set(r 0)
  elseif(rel MATCHES "^kd/cuda/")
    set(r 1)
  elseif(rel MATCHES "^kd/policy/")
    set(r 2)
  elseif(rel MATCHES "^kd/(loss|model|io|text)/")
    set(r 3)
  elseif(rel MATCHES "^kd/train/")
    set(r 4)
  elseif(rel MATCHES "^kd/kd\\.(hpp|cuh)$")
    set(r 5)
  else()
    set(r -1)
  endif()
  set(${out_rank} ${r} PARENT_SCOPE)
endfunction()

file(GLOB_RECURSE _headers RELATIVE ${KD_INCLUDE_DIR} ${KD_INCLUDE_DIR}/kd/*.hpp ${KD_INCLUDE_DIR}/kd/*.cuh)
list(SORT _headers)
set(_problems "")
set(_edges 0)
foreach(_h IN LISTS _headers)
  kd_layer_of(${_h} _rank)
  if(_rank LESS 0)
    string(APPEND _problems "\n  ${_h} is in no layer (kd/core, kd/cuda, kd/policy, kd/loss|model|io|text, kd/train, or kd/kd.hpp|cuh)")
    continue()
  endif()
  list(GET _names ${_rank} _hname)
  file(STRINGS ${KD_INCLUDE_DIR}/${_h} _lines REGEX "^[ \t]*#[ \t]*include[ \t]*<kd/")
  foreach(_line IN LISTS _lines)
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*<([^>]+)>.*$" "\\1" _inc "${_line}")
    math(EXPR _edges "${_edges} + 1")
    kd_layer_of(${_inc} _irank)
    if(_irank LESS 0)
      string(APPEND _problems "\n  ${_h} includes ${_inc}, which is in no layer")
    elseif(_irank GREATER _rank)
      list(GET _names ${_irank} _iname)
      string(APPEND _problems "\n  ${_h} includes ${_inc}: layer '${_iname}' is above layer '${_hname}'")
    endif()
  endforeach()
endforeach()
list(LENGTH _headers _count)
if(_problems)
  message(FATAL_ERROR "kd layering violated:${_problems}")
endif()
message(STATUS "kd layering: ${_count} headers, ${_edges} includes of kd headers, none upward")
