# vcpkg port of limoe. Without features the package is header-only (one configuration, no lib/); the "cuda"
# feature adds the static library limoe_cuda (target limoe::cuda), built for debug and release.
#
# Source: this port is meant to be used as an overlay port from a limoe checkout,
#   vcpkg install limoe --overlay-ports=<limoe>/ports          (classic mode)
#   "overlay-ports": ["<limoe>/ports"] in vcpkg-configuration.json  (manifest mode)
# and then builds the checkout it lives in (<limoe>/ports/limoe/../..). vcpkg's binary cache keys on the port
# files, not on that source tree: pass --no-binarycaching (or bump "port-version") after changing the sources.
# A copy of this port in a registry has no checkout around it and takes the tagged release instead.
if(EXISTS "${CURRENT_PORT_DIR}/../../CMakeLists.txt" AND EXISTS "${CURRENT_PORT_DIR}/../../include/limoe/limoe.hpp")
  get_filename_component(SOURCE_PATH "${CURRENT_PORT_DIR}/../.." ABSOLUTE)
else()
  vcpkg_from_github(
    OUT_SOURCE_PATH SOURCE_PATH
    REPO limoe/limoe
    REF "v${VERSION}"
    SHA512 0  # set to the release archive's SHA512 when the port goes into a registry
    HEAD_REF main
  )
endif()

if("cuda" IN_LIST FEATURES)
  vcpkg_check_linkage(ONLY_STATIC_LIBRARY)  # limoe_cuda is always a static library
  vcpkg_find_cuda(OUT_CUDA_TOOLKIT_ROOT CUDA_TOOLKIT_ROOT)
  set(CUDA_OPTIONS "-DCMAKE_CUDA_COMPILER=${NVCC}" "-DCUDAToolkit_ROOT=${CUDA_TOOLKIT_ROOT}")
else()
  set(VCPKG_BUILD_TYPE release)  # header-only: one configuration is enough
  set(CUDA_OPTIONS)
endif()

vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    cuda LIMOE_CUDA
)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    ${FEATURE_OPTIONS}
    ${CUDA_OPTIONS}
    -DLIMOE_BUILD_TESTS=OFF
    -DLIMOE_BUILD_TOOLS=OFF
    -DLIMOE_BUILD_EXAMPLES=OFF
    -DLIMOE_BUILD_BENCHMARKS=OFF
    -DLIMOE_INSTALL=ON
    -DLIMOE_NATIVE=OFF
  MAYBE_UNUSED_VARIABLES
    LIMOE_NATIVE
    CUDAToolkit_ROOT
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME limoe CONFIG_PATH share/limoe/cmake)

# The project installs its LICENSE under share/doc/limoe; vcpkg wants it as share/limoe/copyright.
file(REMOVE_RECURSE
  "${CURRENT_PACKAGES_DIR}/share/doc"
  "${CURRENT_PACKAGES_DIR}/debug/include"
  "${CURRENT_PACKAGES_DIR}/debug/share"
)
if(NOT "cuda" IN_LIST FEATURES)
  file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/lib" "${CURRENT_PACKAGES_DIR}/debug")
endif()

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
