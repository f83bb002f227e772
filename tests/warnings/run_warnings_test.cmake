# Configures, builds and runs the consumer project in this directory with one compiler
# and a consumer's flags, and fails on any diagnostic. It prints the diagnostics counted
# by warning option and by location; the whole build output is in WORK_DIR/build.log.
# Run as: cmake -DSOURCE_DIR=<attnforge source> -DWORK_DIR=... -DCXX_COMPILER=...
#               -DFLAGS="-Wall ..." [-DGENERATOR=...] [-DEigen3_DIR=...] -P run_warnings_test.cmake
cmake_minimum_required(VERSION 3.20)

foreach(var SOURCE_DIR WORK_DIR CXX_COMPILER FLAGS)
  if(NOT ${var})
    message(FATAL_ERROR "run_warnings_test.cmake: ${var} is not set")
  endif()
endforeach()

set(build_dir ${WORK_DIR}/build)
set(log ${WORK_DIR}/build.log)
file(REMOVE_RECURSE ${WORK_DIR})

set(configure_args -S ${SOURCE_DIR}/tests/warnings -B ${build_dir}
  -DATTNFORGE_SOURCE_DIR=${SOURCE_DIR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  -DCMAKE_BUILD_TYPE= "-DCMAKE_CXX_FLAGS=${FLAGS}")
if(GENERATOR)
  list(APPEND configure_args -G ${GENERATOR})
endif()
if(Eigen3_DIR)
  list(APPEND configure_args -DEigen3_DIR=${Eigen3_DIR})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} ${configure_args}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message("${out}")
  message(FATAL_ERROR "consumer warnings test: configuring with ${CXX_COMPILER} failed (${rc})")
endif()

message(STATUS "consumer warnings test: ${CXX_COMPILER} ${FLAGS}")
execute_process(COMMAND ${CMAKE_COMMAND} --build ${build_dir} --verbose
  RESULT_VARIABLE build_rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
file(WRITE ${log} "${out}")

# One entry per diagnostic line: "file:line:col: warning|error: text [-Wflag]".
string(REPLACE ";" "," text "${out}")
string(REGEX MATCHALL "[^\n]*: (warning|error): [^\n]*" diagnostics "${text}")
list(LENGTH diagnostics n_diagnostics)
set(by_flag "")
set(by_location "")
foreach(diagnostic IN LISTS diagnostics)
  if(diagnostic MATCHES "\\[-W(error=|error,-W)?([^]]+)\\]$")
    list(APPEND by_flag "-W${CMAKE_MATCH_2}")
  else()
    list(APPEND by_flag "(no warning option: a compile error)")
  endif()
  if(diagnostic MATCHES "^([^:]+:[0-9]+):")
    list(APPEND by_location "${CMAKE_MATCH_1}")
  endif()
endforeach()

function(print_counts title values)
  set(distinct ${values})
  list(REMOVE_DUPLICATES distinct)
  set(lines "")
  foreach(value IN LISTS distinct)
    set(count 0)
    foreach(v IN LISTS values)
      if(v STREQUAL value)
        math(EXPR count "${count} + 1")
      endif()
    endforeach()
    # Zero-padded so that a descending sort orders by count.
    string(LENGTH "${count}" digits)
    math(EXPR pad "6 - ${digits}")
    string(REPEAT "0" ${pad} zeros)
    list(APPEND lines "${zeros}${count} ${value}")
  endforeach()
  list(SORT lines ORDER DESCENDING)
  message("  ${title}:")
  foreach(line IN LISTS lines)
    string(REGEX MATCH "^0*([0-9]+) (.*)$" line "${line}")
    message("    ${CMAKE_MATCH_1} ${CMAKE_MATCH_2}")
  endforeach()
endfunction()

if(n_diagnostics GREATER 0)
  message("consumer warnings test: ${n_diagnostics} diagnostics from ${CXX_COMPILER} (full output: ${log})")
  print_counts("by warning option" "${by_flag}")
  print_counts("by location" "${by_location}")
  message(FATAL_ERROR "consumer warnings test: ${CXX_COMPILER} reported ${n_diagnostics} diagnostics (want 0)")
endif()
if(NOT build_rc EQUAL 0)
  message("${out}")
  message(FATAL_ERROR "consumer warnings test: the build with ${CXX_COMPILER} failed (${build_rc})")
endif()
message(STATUS "consumer warnings test: 0 diagnostics from ${CXX_COMPILER}")

execute_process(COMMAND ${build_dir}/consumer_warnings RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "consumer warnings test: consumer_warnings failed (${rc})")
endif()
