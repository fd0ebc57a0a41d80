# Optional: the PyTorch reference's own verification (tests/reference/make_golden.py --check: docs/semantics.md
# section 8 on the reference's functions, its ops against torch's, finite differences of every parameter, the
# float32 run, and the committed golden files against a fresh recomputation). Needs Debian's /usr/bin/python3
# with torch and numpy; without them the script prints "skipped: torch/numpy not importable" and exits 77,
# which CTest reports as skipped. Without /usr/bin/python3 at all the test is not added.
if(EXISTS /usr/bin/python3)
  add_test(NAME golden_reference_check
           COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/make_golden.py --check)
  set_tests_properties(golden_reference_check PROPERTIES LABELS "reference" TIMEOUT 180 SKIP_RETURN_CODE 77)
endif()
