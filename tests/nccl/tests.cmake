# The NCCL communicator (label "cuda"): compiled and linked in CI, run under mpirun -np 1 (every rank count
# works; scripts/gpu-check runs it on the lent GPU). Skips with one line (exit 77) where no device is present.
if(NOT TARGET limoe::nccl)
  return()
endif()
find_program(LIMOE_MPIEXEC NAMES mpirun mpiexec)
add_executable(test_cuda_nccl ${CMAKE_CURRENT_SOURCE_DIR}/nccl/test_cuda_nccl.cpp)
target_link_libraries(test_cuda_nccl PRIVATE limoe::nccl limoe_project_flags limoe_test_flags doctest::doctest)
if(LIMOE_MPIEXEC)
  add_test(NAME test_cuda_nccl COMMAND ${LIMOE_MPIEXEC} --oversubscribe -np 1 $<TARGET_FILE:test_cuda_nccl>)
  set_tests_properties(test_cuda_nccl PROPERTIES LABELS "cuda" SKIP_RETURN_CODE 77 TIMEOUT 120
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
endif()
