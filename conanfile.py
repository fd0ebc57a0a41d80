# Conan 2 recipe for limoe, the header-only CPU library (the optional CUDA part is not packaged here).
#
#   conan create . -s compiler.cppstd=20 --build=missing     # packages the working tree, runs test_package/
#
# Consumers: find_package(limoe CONFIG REQUIRED) and target_link_libraries(... limoe::limoe), with the
# CMakeDeps and CMakeToolchain generators; Eigen, oneTBB, nlohmann_json and zlib come with it.
import os
import re

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.files import copy, load
from conan.tools.layout import basic_layout

required_conan_version = ">=2.0.9"


class LimoeConan(ConanFile):
    name = "limoe"
    description = "LIMoE: the Language-Image Mixture of Experts, header-only C++20 (Eigen, oneTBB)"
    license = "Apache-2.0"
    topics = ("mixture-of-experts", "machine-learning", "contrastive", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    exports_sources = "include/*", "LICENSE"
    no_copy_source = True

    def set_version(self):
        # The one version number lives in CMakeLists.txt: project(limoe VERSION x.y.z ...).
        if self.version:
            return
        text = load(self, os.path.join(self.recipe_folder, "CMakeLists.txt"))
        match = re.search(r"project\(\s*limoe\s+VERSION\s+([0-9]+\.[0-9]+\.[0-9]+)", text)
        if not match:
            raise ValueError("limoe: no 'project(limoe VERSION x.y.z' in CMakeLists.txt")
        self.version = match.group(1)

    def layout(self):
        basic_layout(self)

    def requirements(self):
        # The public headers include all four, so their headers and libraries reach the consumer.
        self.requires("eigen/3.4.0", transitive_headers=True)
        self.requires("onetbb/2021.12.0", transitive_headers=True, transitive_libs=True)
        self.requires("nlohmann_json/3.11.3", transitive_headers=True)
        self.requires("zlib/[>=1.2.11 <2]", transitive_headers=True, transitive_libs=True)

    def package_id(self):
        self.info.clear()

    def validate(self):
        check_min_cppstd(self, 20)

    def build(self):
        pass

    def package(self):
        copy(self, "LICENSE", self.source_folder, os.path.join(self.package_folder, "licenses"))
        # limoe/cuda.hpp declares the CUDA part, which this header-only package does not contain.
        copy(self, "*", os.path.join(self.source_folder, "include"), os.path.join(self.package_folder, "include"),
             excludes=("limoe/cuda.hpp",))

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "limoe")
        self.cpp_info.set_property("cmake_target_name", "limoe::limoe")
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        self.cpp_info.requires = ["eigen::eigen", "onetbb::onetbb", "nlohmann_json::nlohmann_json", "zlib::zlib"]
