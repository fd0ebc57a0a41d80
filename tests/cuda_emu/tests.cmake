# The CUDA backend's kernels on the CPU (label "cuda"; no GPU and no nvcc needed): the kernel sources of
# src/cuda/kernels/ compiled by the host compiler through tests/support/cuda_emu.hpp and compared with the Ref
# backend; built twice, the second time with ThreadSanitizer, so a missing __syncthreads is a reported race.
# test_cuda_emu_backend: the CUDA backend's whole op table (src/cuda/backend/) through the backend harness's
# cases, against Ref; its TSan build runs float and one seed (LIMOE_HARNESS_QUICK). Routing runs on Thrust's CPP
# system there, in a unit of its own (support/emu_routing.cpp, with limoe_thrust_host of tests/CMakeLists.txt).
set(LIMOE_EMU_ROUTING_SRC ${CMAKE_CURRENT_SOURCE_DIR}/support/emu_routing.cpp)
# Whether support/cuda_emu.hpp runs a block's threads as fibers in the plain builds (its own test: x86-64 Linux,
# no address or memory sanitizer in the flags).
set(LIMOE_EMU_FIBERS OFF)
string(TOUPPER "${CMAKE_BUILD_TYPE}" _limoe_emu_config)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64" AND CMAKE_SYSTEM_NAME STREQUAL "Linux" AND
   NOT "${CMAKE_CXX_FLAGS} ${CMAKE_CXX_FLAGS_${_limoe_emu_config}}" MATCHES "sanitize=(address|memory)")
  set(LIMOE_EMU_FIBERS ON)
endif()
set_source_files_properties(${LIMOE_EMU_ROUTING_SRC} PROPERTIES COMPILE_DEFINITIONS LIMOE_CUDA_EMULATION=1)
foreach(variant IN ITEMS plain tsan)
 foreach(what IN ITEMS kernels backend)
  set(name test_cuda_emu_${what})
  if(variant STREQUAL "tsan")
    set(name test_cuda_emu_${what}_tsan)
  endif()
  add_executable(${name} ${CMAKE_CURRENT_SOURCE_DIR}/cuda_emu/test_cuda_emu_${what}.cpp
                         ${CMAKE_CURRENT_SOURCE_DIR}/support/doctest_main.cpp)
  target_link_libraries(${name} PRIVATE limoe::limoe limoe_project_flags doctest::doctest)
  if(what STREQUAL "backend")  # the backend's routing; the kernels alone need no Thrust
    target_sources(${name} PRIVATE ${LIMOE_EMU_ROUTING_SRC})
    target_link_libraries(${name} PRIVATE limoe_thrust_host)
  endif()
  target_include_directories(${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR} ${PROJECT_SOURCE_DIR}/src)
  # -O1 (limoe_test_flags): half the compile time of -O3 (64 s against 125 s on 2 cores for the backend test) and
  # the same run time: the emulated kernels' cost is the CUDA threads meeting at barriers, not the arithmetic.
  target_link_libraries(${name} PRIVATE limoe_test_flags)
  if(variant STREQUAL "tsan")
    target_compile_options(${name} PRIVATE -fsanitize=thread -O1 -g)
    target_compile_definitions(${name} PRIVATE LIMOE_HARNESS_QUICK=1)
    target_link_options(${name} PRIVATE -fsanitize=thread)
  endif()
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS "cuda" TIMEOUT 900 SKIP_RETURN_CODE 77
                       ENVIRONMENT "TSAN_OPTIONS=halt_on_error=1 exitcode=66")
  if(variant STREQUAL "tsan" OR NOT LIMOE_EMU_FIBERS)
    # RUN_SERIAL where each CUDA thread is a host thread (a team of up to 256 meeting at barriers: under TSan,
    # and in every build where support/cuda_emu.hpp has no fibers); two such tests side by side on 2 cores took
    # 86 s instead of 16 + 18. TIMEOUT 900: 7.6 min was seen beside two training runs (the threads' barriers
    # starve when the cores are busy). With fibers (a block's threads on one host thread): 2.5 s for the
    # backend test, 78 s before.
    set_tests_properties(${name} PROPERTIES RUN_SERIAL ON)
  endif()
 endforeach()
endforeach()
