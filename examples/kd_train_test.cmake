# ctest: kd_train on the CPU with tiny settings (real tokenizers, a slice of the corpus).
#  1. Resume: a run stopped after step 20 (--stop-after: checkpoint, exit 75) and resumed logs exactly the
#     losses of an uninterrupted run (teacher and distillation), and its final weights are identical.
#  2. A damaged checkpoint is refused with the part named; a changed configuration is refused.
#  3. Bad input: a missing corpus names the fetch script; a diverging run stops with the NaN/Inf named by
#     loss component; a bad flag is exit 64.
# Args: -DKD_TRAIN=<exe> -DWORK=<dir> -DDATA=<the data folder>
set(common --device cpu --preset tiny --corpus-bytes 60000 --teacher-steps 30 --steps 30 --batch 4 --seq 32
           --eval-every 10 --ckpt-every 10 --eval-windows 4)
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})

function(run_ok)
  execute_process(COMMAND ${KD_TRAIN} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kd_train ${ARGN} failed (${rc}):\n${out}\n${err}")
  endif()
endfunction()
function(run_expect want_rc pattern)
  execute_process(COMMAND ${KD_TRAIN} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL want_rc OR NOT "${out}${err}" MATCHES "${pattern}")
    message(FATAL_ERROR "kd_train ${ARGN}: expected exit ${want_rc} and /${pattern}/, got ${rc}:\n${out}\n${err}")
  endif()
endfunction()
function(same_file a b what)
  file(READ ${a} x)
  file(READ ${b} y)
  if(NOT x STREQUAL y)
    message(FATAL_ERROR "${what}: ${a} and ${b} differ:\n--- uninterrupted\n${x}\n--- resumed\n${y}")
  endif()
endfunction()

# 1. Uninterrupted (A) against stopped + resumed (B).
run_ok(teacher --run ${WORK}/A ${common})
run_expect(75 "stopped at step 20" teacher --run ${WORK}/B ${common} --stop-after 20)
run_ok(teacher --run ${WORK}/B ${common} --resume)
same_file(${WORK}/A/teacher/log.jsonl ${WORK}/B/teacher/log.jsonl "teacher log after resume")
same_file(${WORK}/A/teacher/eval.jsonl ${WORK}/B/teacher/eval.jsonl "teacher evaluations after resume")
same_file(${WORK}/A/teacher/final/model.safetensors ${WORK}/B/teacher/final/model.safetensors "teacher weights after resume")
run_ok(distill --run ${WORK}/A ${common})
run_expect(75 "stopped at step 20" distill --run ${WORK}/B ${common} --stop-after 20)
run_ok(distill --run ${WORK}/B ${common} --resume)
same_file(${WORK}/A/distill/log.jsonl ${WORK}/B/distill/log.jsonl "distillation log after resume")
same_file(${WORK}/A/distill/final/model.safetensors ${WORK}/B/distill/final/model.safetensors "student weights after resume")

# 2. A damaged part and a changed configuration are refused, naming what is wrong.
file(READ ${WORK}/B/distill/ckpt/latest latest)
string(STRIP "${latest}" latest)
set(opt ${WORK}/B/distill/ckpt/${latest}/optimizer.bin)
file(READ ${opt} bytes HEX)
string(SUBSTRING "${bytes}" 0 200 head)
string(LENGTH "${bytes}" n)
math(EXPR rest "${n} - 202")
string(SUBSTRING "${bytes}" 202 ${rest} tail)
string(SUBSTRING "${bytes}" 200 2 byte)
if(byte STREQUAL "00")
  set(byte "01")
else()
  set(byte "00")
endif()
file(WRITE ${WORK}/damaged.hex "${head}${byte}${tail}")
execute_process(COMMAND xxd -r -p ${WORK}/damaged.hex ${opt} RESULT_VARIABLE xrc)
if(NOT xrc EQUAL 0)
  message(FATAL_ERROR "xxd failed")
endif()
run_expect(2 "part 'optimizer' \\(optimizer.bin\\): checksum mismatch" distill --run ${WORK}/B ${common} --resume)
run_expect(2 "run_config|configuration" teacher --run ${WORK}/B ${common} --batch 2 --resume)

# 3. Bad input.
run_expect(2 "no-data/tokenizers/qwen3/tokenizer.json: cannot open \\(run scripts/fetch_text_data.sh" teacher --run ${WORK}/C ${common} --data ${WORK}/no-data)
file(MAKE_DIRECTORY ${WORK}/partial)
file(CREATE_LINK ${DATA}/tokenizers ${WORK}/partial/tokenizers SYMBOLIC)
run_expect(2 "partial/corpus/kjv.txt: missing \\(run scripts/fetch_text_data.sh" teacher --run ${WORK}/C ${common} --data ${WORK}/partial)
# A corpus that is not UTF-8 is named with the offset of its first bad byte; an empty one is refused.
string(ASCII 255 bad)
file(WRITE ${WORK}/bad.txt "In the beginning ${bad} was the word.\n")
run_expect(2 "bad.txt.*(UTF-8|utf-8)" teacher --run ${WORK}/E ${common} --corpus ${WORK}/bad.txt)
file(WRITE ${WORK}/empty.txt "")
run_expect(2 "empty.txt.*empty|empty.*empty.txt" teacher --run ${WORK}/E ${common} --corpus ${WORK}/empty.txt)
# A diverging run (absurd learning rate) stops at the first non-finite value with what held it named:
# a loss component, or the tensor whose gradient the optimizer refused (no update applied).
run_expect(2 "(not finite|NaN|Inf).*(component '[a-z_]+'|tensor '[a-z_.0-9]+')" teacher --run ${WORK}/D ${common} --teacher-lr 1e12)
run_expect(64 "unknown flag" teacher --no-such-flag)
run_expect(64 "apply to distill and scratch" teacher --run ${WORK}/D ${common} --ranks 2)

# 4. Data parallel on CPU ranks (threads): 2 ranks x 2 rows log the losses of 1 process x 4 rows on the
#    same global batches (to float rounding: the ranks' gradients are summed in another order), every
#    rank applies the same update; a run stopped on 2 ranks resumes on 1 (the loader state is global).
foreach(dp DP1 DP2 DP3)
  file(MAKE_DIRECTORY ${WORK}/${dp}/teacher)
  file(COPY ${WORK}/A/teacher/final DESTINATION ${WORK}/${dp}/teacher)
endforeach()
run_ok(distill --run ${WORK}/DP1 ${common})
run_ok(distill --run ${WORK}/DP2 ${common} --batch 2 --ranks 2)
function(close_files a b what)
  execute_process(COMMAND ${JSONL_CLOSE} ${a} ${b} 1e-4 1e-6 RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what}: ${a} and ${b} differ beyond float rounding: ${err}")
  endif()
endfunction()
close_files(${WORK}/DP1/distill/log.jsonl ${WORK}/DP2/distill/log.jsonl "2 CPU ranks against 1")
close_files(${WORK}/DP1/distill/eval.jsonl ${WORK}/DP2/distill/eval.jsonl "2 CPU ranks against 1 (evaluations)")
run_expect(75 "stopped at step 20" distill --run ${WORK}/DP3 ${common} --batch 2 --ranks 2 --stop-after 20)
run_expect(0 "resumed from" distill --run ${WORK}/DP3 ${common} --batch 4 --ranks 1 --resume)
close_files(${WORK}/DP1/distill/log.jsonl ${WORK}/DP3/distill/log.jsonl "2 CPU ranks resumed on 1")
