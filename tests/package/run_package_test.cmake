# cmake -P script behind the package_consumer test (see CMakeLists.txt beside it). Fails with a message naming
# the step: install, install layout, relocatability, consumer configure, build or run.
foreach(v LIMOE_SOURCE_DIR LIMOE_BINARY_DIR LIMOE_VERSION WORK_DIR CONSUMER_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${v} OR "${${v}}" STREQUAL "")
    message(FATAL_ERROR "run_package_test.cmake: -D${v}=... is required")
  endif()
endforeach()

function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "package test: ${step} failed (${rc})\n$ ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "package test: ${step}: ok")
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
set(stage ${WORK_DIR}/stage)
set(prefix ${WORK_DIR}/moved/prefix)
file(REMOVE_RECURSE ${WORK_DIR})

# 1. Install the library component of the build tree.
run("install" ${CMAKE_COMMAND} --install ${LIMOE_BINARY_DIR} --prefix ${stage} --component limoe_Development
    ${config_args})

# 2. The layout that find_package and the ports rely on.
set(expected include/limoe/limoe.hpp include/limoe/core/tensor.hpp share/limoe/cmake/limoeConfig.cmake
    share/limoe/cmake/limoeConfigVersion.cmake share/limoe/cmake/limoeTargets.cmake share/doc/limoe/LICENSE)
if(LIMOE_EXPECT_CUDA)
  list(APPEND expected include/limoe/cuda.hpp share/limoe/cmake/limoeCudaTargets.cmake)
endif()
foreach(f IN LISTS expected)
  if(NOT EXISTS ${stage}/${f})
    message(FATAL_ERROR "package test: the install lacks ${f}")
  endif()
endforeach()
if(NOT LIMOE_EXPECT_CUDA AND EXISTS ${stage}/include/limoe/cuda.hpp)
  message(FATAL_ERROR "package test: include/limoe/cuda.hpp installed without the CUDA library")
endif()

# 3. Relocatable: no file of the package names the source, build or install directory.
file(GLOB_RECURSE cmake_files ${stage}/share/limoe/cmake/*)
foreach(f IN LISTS cmake_files)
  file(READ ${f} text)
  foreach(dir ${LIMOE_SOURCE_DIR} ${LIMOE_BINARY_DIR} ${stage})
    string(FIND "${text}" "${dir}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "package test: ${f} contains the absolute path ${dir}: the package is not relocatable")
    endif()
  endforeach()
endforeach()
file(MAKE_DIRECTORY ${WORK_DIR}/moved)
file(RENAME ${stage} ${prefix})

# 4. A separate project finds the moved package, builds and runs.
set(configure_args -S ${CONSUMER_DIR} -B ${WORK_DIR}/build -G "${GENERATOR}" -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
    -DLIMOE_EXPECTED_VERSION=${LIMOE_VERSION} -DLIMOE_EXPECT_CUDA=${LIMOE_EXPECT_CUDA})
if(MAKE_PROGRAM)
  list(APPEND configure_args -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
if(CONFIG)
  list(APPEND configure_args -DCMAKE_BUILD_TYPE=${CONFIG})
endif()
if(CUDA_ROOT)
  list(APPEND configure_args -DCUDAToolkit_ROOT=${CUDA_ROOT})
endif()
if(TOOLCHAIN_FILE)
  list(APPEND configure_args -DCMAKE_TOOLCHAIN_FILE=${TOOLCHAIN_FILE})
endif()
run("consumer configure" ${CMAKE_COMMAND} ${configure_args})

# It must have used the moved package, not one installed elsewhere on the machine.
file(STRINGS ${WORK_DIR}/build/CMakeCache.txt limoe_dir REGEX "^limoe_DIR:")
string(REGEX REPLACE "^limoe_DIR:[A-Z]+=" "" limoe_dir "${limoe_dir}")
if(NOT limoe_dir STREQUAL "${prefix}/share/limoe/cmake")
  message(FATAL_ERROR "package test: the consumer found limoe in '${limoe_dir}', not in ${prefix}/share/limoe/cmake")
endif()

run("consumer build" ${CMAKE_COMMAND} --build ${WORK_DIR}/build ${config_args})
set(ctest_config)
if(CONFIG)
  set(ctest_config -C ${CONFIG})
endif()
run("consumer run" ${CMAKE_CTEST_COMMAND} --test-dir ${WORK_DIR}/build ${ctest_config} --output-on-failure)
message(STATUS "package test: limoe ${LIMOE_VERSION} installed, moved and used from ${prefix}")
