# Routing on Thrust on the CPU (label "cuda": the CUDA backend's routing, run through Thrust's CPP and TBB
# systems by the host compiler). Needs only the CUDA toolkit's headers (the `cccl` folder, limoe_thrust_host in
# tests/CMakeLists.txt), not nvcc or a GPU.
add_executable(test_cuda_thrust_routing ${CMAKE_CURRENT_SOURCE_DIR}/thrust/test_parallel_routing.cpp)
target_link_libraries(test_cuda_thrust_routing PRIVATE limoe::limoe limoe_project_flags limoe_test_flags limoe_test_main
                      limoe_thrust_host doctest::doctest)
add_test(NAME test_cuda_thrust_routing COMMAND test_cuda_thrust_routing)
set_tests_properties(test_cuda_thrust_routing PROPERTIES LABELS "cuda" TIMEOUT 300 SKIP_RETURN_CODE 77)
