# Many processes (label "mpi"): the test program under mpirun with 2 and 4 ranks (--oversubscribe: CI has 2
# cores), and the fail-fast check: a rank that throws ends the job with its message instead of hanging.
if(NOT LIMOE_WITH_MPI)
  return()
endif()
find_program(LIMOE_MPIEXEC NAMES mpirun mpiexec)
if(NOT LIMOE_MPIEXEC)
  message(STATUS "limoe: mpirun not found; the MPI tests are not registered")
  return()
endif()
add_executable(test_mpi ${CMAKE_CURRENT_SOURCE_DIR}/mpi/test_mpi.cpp)
target_link_libraries(test_mpi PRIVATE limoe::mpi limoe_instances limoe_instances_double limoe_project_flags limoe_test_flags doctest::doctest)
# OpenMPI refuses to start as root unless told; CI runs as root.
set(_limoe_mpi_env "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
foreach(np 2 4)
  add_test(NAME test_mpi_np${np} COMMAND ${LIMOE_MPIEXEC} --oversubscribe -np ${np} $<TARGET_FILE:test_mpi>)
  set_tests_properties(test_mpi_np${np} PROPERTIES LABELS "mpi" TIMEOUT 300 PROCESSORS 2 ENVIRONMENT "${_limoe_mpi_env}")
endforeach()
add_test(NAME test_mpi_rank_failure COMMAND ${LIMOE_MPIEXEC} --oversubscribe -np 3 $<TARGET_FILE:test_mpi> --throw-on-rank 1)
set_tests_properties(test_mpi_rank_failure PROPERTIES LABELS "mpi" TIMEOUT 60 PROCESSORS 2 ENVIRONMENT "${_limoe_mpi_env}"
  PASS_REGULAR_EXPRESSION "rank 1: injected failure on this rank")
add_test(NAME test_mpi_rank_failure_in_backward COMMAND ${LIMOE_MPIEXEC} --oversubscribe -np 2 $<TARGET_FILE:test_mpi> --throw-in-backward 1)
set_tests_properties(test_mpi_rank_failure_in_backward PROPERTIES LABELS "mpi" TIMEOUT 60 PROCESSORS 2
  ENVIRONMENT "${_limoe_mpi_env}" PASS_REGULAR_EXPRESSION "rank 1: injected failure in backward")

# A model on the CUDA backend (through the CPU emulation; its routing on Thrust's CPP system) trained data
# parallel on 2 ranks.
if(TARGET limoe_thrust_host)
  add_executable(test_mpi_cuda_emu ${CMAKE_CURRENT_SOURCE_DIR}/mpi/test_mpi_cuda_emu.cpp ${LIMOE_EMU_ROUTING_SRC})
  target_link_libraries(test_mpi_cuda_emu PRIVATE limoe::mpi limoe_project_flags limoe_test_flags limoe_thrust_host
                        doctest::doctest)
  target_include_directories(test_mpi_cuda_emu PRIVATE ${CMAKE_CURRENT_SOURCE_DIR} ${PROJECT_SOURCE_DIR}/src)
  add_test(NAME test_mpi_cuda_emu_np2 COMMAND ${LIMOE_MPIEXEC} --oversubscribe -np 2 $<TARGET_FILE:test_mpi_cuda_emu>)
  set_tests_properties(test_mpi_cuda_emu_np2 PROPERTIES LABELS "mpi" TIMEOUT 300 PROCESSORS 2 RUN_SERIAL ON
                       ENVIRONMENT "${_limoe_mpi_env}")
endif()
