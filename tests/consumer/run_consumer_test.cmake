# Installs attnforge from ATTNFORGE_BUILD_DIR into WORK_DIR/prefix, then configures,
# builds and runs the consumer project in CONSUMER_SOURCE_DIR against that prefix.
# Run as: cmake -DATTNFORGE_BUILD_DIR=... -DCONSUMER_SOURCE_DIR=... -DWORK_DIR=...
#               [-DCONFIG=...] [-DGENERATOR=...] [-DCXX_COMPILER=...]
#               [-DEigen3_DIR=...] -P run_consumer_test.cmake
cmake_minimum_required(VERSION 3.20)

foreach(var ATTNFORGE_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "run_consumer_test.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

set(prefix ${WORK_DIR}/prefix)
set(consumer_build ${WORK_DIR}/build)
# Start clean so the test sees exactly what the current tree installs.
file(REMOVE_RECURSE ${WORK_DIR})

function(run_step name)
  message(STATUS "consumer test: ${name}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: '${name}' failed (${rc})")
  endif()
endfunction()

run_step("install attnforge into ${prefix}"
  ${CMAKE_COMMAND} --install ${ATTNFORGE_BUILD_DIR} --prefix ${prefix} --config ${CONFIG})

set(configure_args -S ${CONSUMER_SOURCE_DIR} -B ${consumer_build}
  -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=${CONFIG})
if(GENERATOR)
  list(APPEND configure_args -G ${GENERATOR})
endif()
if(CXX_COMPILER)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()
if(Eigen3_DIR)
  list(APPEND configure_args -DEigen3_DIR=${Eigen3_DIR})
endif()
run_step("configure consumer" ${CMAKE_COMMAND} ${configure_args})
run_step("build consumer" ${CMAKE_COMMAND} --build ${consumer_build} --config ${CONFIG})

find_program(consumer_exe attnforge_consumer
  PATHS ${consumer_build} ${consumer_build}/${CONFIG} NO_DEFAULT_PATH REQUIRED)
run_step("run consumer" ${consumer_exe})
