# The optional CUDA part: limoe::cuda (library limoe_cuda), compiled by nvcc only. Public CPU headers never
# include it; its host interface is include/limoe/cuda.hpp, which uses no CUDA type.
#
#   LIMOE_CUDA=AUTO  builds it when a working CUDA compiler is found (the default), else skips it quietly
#   LIMOE_CUDA=ON    requires it;  LIMOE_CUDA=OFF  never looks for nvcc (a plain CPU build)
#   CMAKE_CUDA_ARCHITECTURES (or the CUDAARCHS environment variable) is respected; the default "80-real;90"
#   gives Ampere and Hopper (H100/H200) machine code plus compute_90 PTX that newer GPUs compile at load.
string(TOUPPER "${LIMOE_CUDA}" _limoe_cuda_mode)
if(_limoe_cuda_mode MATCHES "^(ON|YES|TRUE|Y|1)$")
  set(_limoe_cuda_mode ON)
elseif(_limoe_cuda_mode MATCHES "^(OFF|NO|FALSE|N|0)$")
  set(_limoe_cuda_mode OFF)
elseif(NOT _limoe_cuda_mode STREQUAL "AUTO")
  message(FATAL_ERROR "LIMOE_CUDA must be AUTO, ON or OFF (got '${LIMOE_CUDA}')")
endif()

set(LIMOE_WITH_CUDA OFF)
if(NOT _limoe_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(LIMOE_WITH_CUDA ON)
  elseif(_limoe_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "LIMOE_CUDA=ON but no working CUDA compiler was found: install the CUDA Toolkit, put nvcc "
                        "on PATH or set CMAKE_CUDA_COMPILER (and CMAKE_CUDA_HOST_COMPILER if nvcc rejects the default "
                        "host compiler); or configure with -DLIMOE_CUDA=OFF")
  endif()
endif()
message(STATUS "limoe: CUDA part ${LIMOE_WITH_CUDA} (LIMOE_CUDA=${LIMOE_CUDA})")

if(LIMOE_WITH_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES "80-real;90" CACHE STRING "CUDA architectures limoe_cuda is compiled for")
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "limoe: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES}")

  add_library(limoe_cuda STATIC
    ${PROJECT_SOURCE_DIR}/src/cuda/backend.cu
    ${PROJECT_SOURCE_DIR}/src/cuda/device.cu
    ${PROJECT_SOURCE_DIR}/src/cuda/math.cu
    ${PROJECT_SOURCE_DIR}/src/cuda/routing.cu
    ${PROJECT_SOURCE_DIR}/src/cuda/rows.cu
    ${PROJECT_SOURCE_DIR}/src/cuda/saxpy.cu
    ${PROJECT_SOURCE_DIR}/src/cuda/sort.cu)
  add_library(limoe::cuda ALIAS limoe_cuda)
  set_target_properties(limoe_cuda PROPERTIES
    EXPORT_NAME cuda
    POSITION_INDEPENDENT_CODE ON       # so it can go into shared libraries and Python modules too
    CUDA_SEPARABLE_COMPILATION OFF     # no relocatable device code: users link it with a plain C++ linker
    CUDA_RUNTIME_LIBRARY Static)
  # C++20 for the .cu files (they include <limoe/cuda.hpp>, which uses std::span). CMake 3.25 does not know
  # nvcc's C++20 flag (cuda_std_20 arrived in a later CMake), so pass it by hand there.
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    set_target_properties(limoe_cuda PROPERTIES CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF)
  else()
    target_compile_options(limoe_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  endif()
  target_include_directories(limoe_cuda PRIVATE ${PROJECT_SOURCE_DIR}/src/cuda)
  # Host-and-device lambdas (moe/parallel_routing.hpp's, run by Thrust on the device).
  target_compile_options(limoe_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--extended-lambda>)
  # Users get the CPU library (limoe/core/error.hpp for limoe::Error), the static CUDA runtime and cuBLAS (the
  # backend's products); they need neither nvcc nor the CUDA language enabled, only the toolkit's libraries
  # (find_dependency(CUDAToolkit)).
  target_link_libraries(limoe_cuda PUBLIC limoe_library CUDA::cublas CUDA::cublasLt PRIVATE CUDA::cudart_static)
  if(LIMOE_TOP_LEVEL)
    target_compile_options(limoe_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
  endif()
endif()

# The GPU benchmark (bench/cuda/): built with the project's own targets, run by scripts/gpu-check.
if(LIMOE_WITH_CUDA AND LIMOE_TOP_LEVEL)
  add_executable(bench_cuda_moe ${PROJECT_SOURCE_DIR}/bench/cuda/bench_cuda_moe.cpp)
  target_link_libraries(bench_cuda_moe PRIVATE limoe::cuda limoe_project_flags)
endif()
