# ctest driver of the CLI path scripts/hf_compare.py uses: kd_model init (tiny teacher and student) writes
# config.json + model.safetensors, `tokens` writes input ids, `logits` loads the checkpoint and runs the
# CPU backend; a corrupt tokens file must fail with a message.
foreach(arch teacher student)
  set(dir ${WORK}/${arch})
  file(REMOVE_RECURSE ${dir})
  execute_process(COMMAND ${KD_MODEL} init --arch ${arch} --preset tiny --out ${dir} --dtype float32 --seed 3
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kd_model init ${arch} failed (${rc})")
  endif()
  foreach(f config.json model.safetensors)
    if(NOT EXISTS ${dir}/${f})
      message(FATAL_ERROR "kd_model init ${arch} wrote no ${f}")
    endif()
  endforeach()
  execute_process(COMMAND ${KD_MODEL} tokens --model ${dir} --batch 2 --seq 9 --out ${dir}/tokens.safetensors
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kd_model tokens ${arch} failed (${rc})")
  endif()
  execute_process(COMMAND ${KD_MODEL} logits --model ${dir} --tokens ${dir}/tokens.safetensors
                          --out ${dir}/logits.safetensors --backend cpu RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 OR NOT EXISTS ${dir}/logits.safetensors)
    message(FATAL_ERROR "kd_model logits ${arch} failed (${rc})")
  endif()
  # A bad token file is refused with a message, not a crash.
  execute_process(COMMAND ${KD_MODEL} logits --model ${dir} --tokens ${dir}/config.json --out ${dir}/x.safetensors
                  RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(rc EQUAL 0 OR NOT err MATCHES "kd_model: ")
    message(FATAL_ERROR "kd_model logits accepted a corrupt tokens file: ${err}")
  endif()
endforeach()
