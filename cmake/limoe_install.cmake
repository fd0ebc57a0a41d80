# Install rules: headers, exported targets, package config and version file, license. Relocatable: every
# installed path is relative to the install prefix (no source, build or prefix path is written into the
# package), so the installed tree can be moved or packaged (vcpkg, Conan, a tarball) as it is.
#
#   <prefix>/include/limoe/...                      the headers (cuda.hpp only when the CUDA part is built)
#   <prefix>/lib/liblimoe_cuda.a                    the CUDA part, when built
#   <prefix>/share/limoe/cmake/limoeConfig.cmake    find_package(limoe CONFIG): limoe::limoe, limoe::cuda
#   <prefix>/share/doc/limoe/LICENSE
#
# Everything is in the install component "limoe_Development": `cmake --install <build> --component
# limoe_Development` installs the library alone (the package test does that), whatever else the tree builds.
include(CMakePackageConfigHelpers)

set(LIMOE_INSTALL_CMAKEDIR ${CMAKE_INSTALL_DATADIR}/limoe/cmake)
set(_limoe_component COMPONENT limoe_Development)

if(LIMOE_WITH_CUDA)
  install(DIRECTORY include/limoe DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} ${_limoe_component})
else()
  # Without the library behind it, limoe/cuda.hpp would only give link errors.
  install(DIRECTORY include/limoe DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} ${_limoe_component}
    REGEX "/include/limoe/cuda\\.hpp$" EXCLUDE)
endif()

install(TARGETS limoe_library EXPORT limoeTargets ${_limoe_component})
install(EXPORT limoeTargets NAMESPACE limoe:: DESTINATION ${LIMOE_INSTALL_CMAKEDIR} ${_limoe_component})
# The same targets for find_package(limoe) straight from this build tree (limoe_DIR=<build dir>).
export(EXPORT limoeTargets NAMESPACE limoe:: FILE ${PROJECT_BINARY_DIR}/limoeTargets.cmake)

if(LIMOE_WITH_CUDA)
  # Its own export set, so that limoeConfig.cmake can load it only where the CUDA Toolkit is found: a CPU
  # user of a CUDA-enabled package does not need the toolkit.
  install(TARGETS limoe_cuda EXPORT limoeCudaTargets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} ${_limoe_component})
  install(EXPORT limoeCudaTargets NAMESPACE limoe:: DESTINATION ${LIMOE_INSTALL_CMAKEDIR} ${_limoe_component})
  export(EXPORT limoeCudaTargets NAMESPACE limoe:: FILE ${PROJECT_BINARY_DIR}/limoeCudaTargets.cmake)
  set(_limoe_arch_independent)
else()
  set(_limoe_arch_independent ARCH_INDEPENDENT)  # headers only: any architecture may use it
endif()

if(LIMOE_WITH_MPI)
  # The optional MPI communicator: its own export set, loaded by limoeConfig.cmake where MPI is found.
  install(TARGETS limoe_mpi EXPORT limoeMpiTargets ${_limoe_component})
  install(EXPORT limoeMpiTargets NAMESPACE limoe:: DESTINATION ${LIMOE_INSTALL_CMAKEDIR} ${_limoe_component})
  export(EXPORT limoeMpiTargets NAMESPACE limoe:: FILE ${PROJECT_BINARY_DIR}/limoeMpiTargets.cmake)
endif()
if(LIMOE_WITH_SENTENCEPIECE)
  # The optional SentencePiece tokenizer: its own export set, loaded by limoeConfig.cmake where the library is
  # installed (it links libsentencepiece by name).
  install(TARGETS limoe_sentencepiece EXPORT limoeSentencePieceTargets ${_limoe_component})
  install(EXPORT limoeSentencePieceTargets NAMESPACE limoe:: DESTINATION ${LIMOE_INSTALL_CMAKEDIR} ${_limoe_component})
  export(EXPORT limoeSentencePieceTargets NAMESPACE limoe:: FILE ${PROJECT_BINARY_DIR}/limoeSentencePieceTargets.cmake)
endif()

configure_package_config_file(cmake/limoeConfig.cmake.in ${PROJECT_BINARY_DIR}/limoeConfig.cmake
  INSTALL_DESTINATION ${LIMOE_INSTALL_CMAKEDIR}
  NO_SET_AND_CHECK_MACRO)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/limoeConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ${_limoe_arch_independent})
install(FILES ${PROJECT_BINARY_DIR}/limoeConfig.cmake ${PROJECT_BINARY_DIR}/limoeConfigVersion.cmake
  DESTINATION ${LIMOE_INSTALL_CMAKEDIR} ${_limoe_component})
if(EXISTS ${PROJECT_SOURCE_DIR}/LICENSE)
  install(FILES ${PROJECT_SOURCE_DIR}/LICENSE DESTINATION ${CMAKE_INSTALL_DOCDIR} ${_limoe_component})
endif()
