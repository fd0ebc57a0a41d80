# The SentencePiece tokenizer (optional component, label "unit"): built when libsentencepiece-dev is found.
add_executable(test_sentencepiece ${CMAKE_CURRENT_SOURCE_DIR}/sentencepiece/test_sentencepiece.cpp)
target_link_libraries(test_sentencepiece PRIVATE limoe::sentencepiece limoe_instances limoe_instances_double limoe_project_flags limoe_test_flags limoe_test_main doctest::doctest)
add_test(NAME test_sentencepiece COMMAND test_sentencepiece)
set_tests_properties(test_sentencepiece PROPERTIES LABELS "unit" TIMEOUT 300 SKIP_RETURN_CODE 77)
