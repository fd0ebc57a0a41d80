# Tests of the `limoe` command-line program (the public contract of docs/cli.md): run the real
# binary, check exit codes, one-line errors, that no output file is left behind on failure, the golden
# embeddings, and that a resumed training run continues the same curve.
if(TARGET limoe)
  add_executable(test_cli ${CMAKE_CURRENT_LIST_DIR}/test_cli.cpp)
  target_link_libraries(test_cli PRIVATE limoe::limoe limoe_instances limoe_instances_double limoe_project_flags limoe_test_flags limoe_test_main doctest::doctest)
  target_compile_definitions(test_cli PRIVATE LIMOE_CLI_PATH="$<TARGET_FILE:limoe>"
                                              LIMOE_TEST_DATA_DIR="${CMAKE_CURRENT_LIST_DIR}/../data"
                                              LIMOE_SCRIPTS_DIR="${PROJECT_SOURCE_DIR}/scripts")
  add_dependencies(test_cli limoe)
  if(LIMOE_WITH_CUDA)
    target_compile_definitions(test_cli PRIVATE LIMOE_CLI_CUDA)  # the program has --device cuda built in
  endif()
  if(LIMOE_WITH_MPI)
    find_program(LIMOE_MPIEXEC NAMES mpirun mpiexec)
    if(LIMOE_MPIEXEC)
      target_compile_definitions(test_cli PRIVATE LIMOE_MPIRUN="${LIMOE_MPIEXEC}")
    endif()
  endif()
  add_test(NAME test_cli COMMAND test_cli)
  set_tests_properties(test_cli PROPERTIES LABELS "cli" TIMEOUT 600 SKIP_RETURN_CODE 77)
endif()
