# Install rules: headers, exported target, package config (relocatable).
include(CMakePackageConfigHelpers)
install(DIRECTORY include/limoe DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS limoe EXPORT limoeTargets)
install(EXPORT limoeTargets NAMESPACE limoe:: DESTINATION ${CMAKE_INSTALL_DATADIR}/limoe/cmake)
configure_package_config_file(cmake/limoeConfig.cmake.in ${PROJECT_BINARY_DIR}/limoeConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_DATADIR}/limoe/cmake)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/limoeConfigVersion.cmake COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/limoeConfig.cmake ${PROJECT_BINARY_DIR}/limoeConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_DATADIR}/limoe/cmake)
