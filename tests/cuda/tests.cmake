# CUDA tests (label "cuda"): one executable per tests/cuda/test_*.cpp, linked with limoe::cuda and a shared
# main that exits 77 (CTest SKIP_RETURN_CODE: reported as skipped, not failed) when no CUDA device is usable,
# after checking that the no-device path itself is clean. Included from tests/CMakeLists.txt when
# LIMOE_WITH_CUDA. The test files are plain C++: they see the host interface <limoe/cuda.hpp> and the CUDA backend's op
# table <limoe/backend/cuda.hpp> (declarations; limoe_cuda holds the nvcc-compiled definitions).
add_library(limoe_cuda_test_main OBJECT ${CMAKE_CURRENT_SOURCE_DIR}/cuda/cuda_test_main.cpp)
target_link_libraries(limoe_cuda_test_main PUBLIC limoe::cuda doctest::doctest PRIVATE limoe_project_flags)

file(GLOB LIMOE_CUDA_TESTS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cuda/test_*.cpp)
foreach(src IN LISTS LIMOE_CUDA_TESTS)
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE limoe::cuda limoe_project_flags limoe_test_flags limoe_cuda_test_main doctest::doctest)
  target_include_directories(${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS "cuda" SKIP_RETURN_CODE 77 TIMEOUT 300)
endforeach()

# The whole model on the GPU uses the model compiled once (the CPU's and the CUDA backend's instances).
target_link_libraries(test_cuda_model PRIVATE limoe_instances limoe_instances_cuda)

# No register spills and no stack frames in the CUDA backend's kernels (nvcc --resource-usage, sm_90).
add_test(NAME test_cuda_resource_usage
         COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cuda/resource_check.sh ${CMAKE_CUDA_COMPILER} ${PROJECT_SOURCE_DIR})
set_tests_properties(test_cuda_resource_usage PROPERTIES LABELS "cuda" TIMEOUT 300)
