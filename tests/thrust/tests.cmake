# Routing on Thrust on the CPU (label "cuda": the CUDA backend's routing, run through Thrust's CPP and TBB
# systems by the host compiler). Needs only the CUDA toolkit's headers (the `cccl` folder), not nvcc or a GPU.
find_path(LIMOE_CCCL_INCLUDE_DIR thrust/version.h
  HINTS ${CUDAToolkit_INCLUDE_DIRS} ${CUDAToolkit_INCLUDE_DIRS}/cccl /usr/local/cuda/targets/x86_64-linux/include/cccl
        /usr/local/cuda/include/cccl /usr/local/cuda/include)
if(LIMOE_CCCL_INCLUDE_DIR)
  add_executable(test_cuda_thrust_routing ${CMAKE_CURRENT_SOURCE_DIR}/thrust/test_parallel_routing.cpp)
  target_link_libraries(test_cuda_thrust_routing PRIVATE limoe::limoe limoe_project_flags limoe_test_flags limoe_test_main doctest::doctest)
  target_include_directories(test_cuda_thrust_routing SYSTEM PRIVATE ${LIMOE_CCCL_INCLUDE_DIR})
  target_compile_definitions(test_cuda_thrust_routing PRIVATE THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP
                             THRUST_HOST_SYSTEM=THRUST_HOST_SYSTEM_CPP)
  add_test(NAME test_cuda_thrust_routing COMMAND test_cuda_thrust_routing)
  set_tests_properties(test_cuda_thrust_routing PROPERTIES LABELS "cuda" TIMEOUT 300 SKIP_RETURN_CODE 77)
else()
  message(STATUS "limoe: Thrust headers not found; test_cuda_thrust_routing not built")
endif()
