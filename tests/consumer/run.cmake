# ctest `consumer_package`: installs the build tree into a temporary prefix, builds tests/consumer
# against it with find_package(nibble), compiles the same main.cpp through pkg-config, runs both.
# -D NIBBLE_BUILD=<build dir> SRC=<tests/consumer> WORK=<scratch dir> CXX=<compiler> GEN=<generator>
cmake_minimum_required(VERSION 3.22)
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
set(prefix "${WORK}/prefix")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer: `${ARGN}` failed (${rc}):\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()
run(${CMAKE_COMMAND} --install "${NIBBLE_BUILD}" --prefix "${prefix}")
# 1. CMake package
run(${CMAKE_COMMAND} -S "${SRC}" -B "${WORK}/build" -G "${GEN}" -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${prefix})
run(${CMAKE_COMMAND} --build "${WORK}/build")
run("${WORK}/build/consumer" "${WORK}/sample_cmake.safetensors")
# 2. pkg-config
find_program(PKG_CONFIG pkg-config REQUIRED)
file(GLOB pcdir "${prefix}/lib*/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "${pcdir}")
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs nibble RESULT_VARIABLE rc OUTPUT_VARIABLE flags
                OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "consumer: pkg-config --cflags --libs nibble failed")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
run(${CXX} -O1 "${SRC}/main.cpp" -o "${WORK}/consumer_pc" ${flags})
run("${WORK}/consumer_pc" "${WORK}/sample_pc.safetensors")
file(REMOVE_RECURSE "${WORK}")
