# Included from tests/CMakeLists.txt when LIMOE_INSTALL is on: the package test lives in package/CMakeLists.txt.
add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/package ${CMAKE_CURRENT_BINARY_DIR}/package)
