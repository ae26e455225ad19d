# ctest: `kd_text encode` prints exactly the reference ids of tests/text_fixtures/sample.txt (written by
# scripts/make_tokenizer_fixtures.sh from the npm packages' JavaScript) for both tokenizers, and a missing
# tokenizer file names the script that fetches it.
# Args: -DKD_TEXT=<exe> -DFIXTURES=<dir>
foreach(tok qwen3 gpt2)
  execute_process(COMMAND ${KD_TEXT} encode --tokenizer ${tok} ${FIXTURES}/sample.txt
                  OUTPUT_VARIABLE got RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kd_text encode --tokenizer ${tok} failed (${rc}): ${err}")
  endif()
  file(READ ${FIXTURES}/sample.${tok}.ids want)
  if(NOT got STREQUAL want)
    message(FATAL_ERROR "kd_text encode --tokenizer ${tok}: ids differ from ${FIXTURES}/sample.${tok}.ids")
  endif()
endforeach()
execute_process(COMMAND ${CMAKE_COMMAND} -E env KD_TEXT_DATA=/nonexistent-kd-data
                        ${KD_TEXT} encode --tokenizer gpt2 ${FIXTURES}/sample.txt
                RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_QUIET)
if(rc EQUAL 0 OR NOT err MATCHES "/nonexistent-kd-data/tokenizers/gpt2/encoder.json: cannot open \\(run scripts/fetch_text_data.sh\\)")
  message(FATAL_ERROR "a missing tokenizer file must name scripts/fetch_text_data.sh; got (${rc}): ${err}")
endif()
