# Chooses the Metal bridge: csrc/metal/bridge.m (Objective-C, macOS) or csrc/metal/bridge_stub.c.
#
#   MTLFLASH_METAL=AUTO (default)  on macOS, compile bridge.m once at configure time; if that fails
#                                  (no Objective-C compiler, an SDK that rejects the file, ...),
#                                  build the stub, print why, and let backend_info() report
#                                  "Metal backend not built: <reason>" at run time. The install
#                                  never fails because of the bridge.
#   MTLFLASH_METAL=ON              bridge.m must build (configure fails otherwise; macOS only).
#   MTLFLASH_METAL=OFF             the stub, with that reason.
#
# Testing knobs (tests/test_build_config.py): MTLFLASH_METAL_BRIDGE_SOURCE replaces the file the
# probe compiles; MTLFLASH_METAL_PROBE_ON_HOST=ON runs the AUTO probe on a non-Apple host with
# MTLFLASH_METAL_PROBE_FLAGS (e.g. --target=arm64-apple-macos13 and tests/macos_decls), so the
# fallback can be shown on Linux; the stub is built either way there.
#
# Sets MF_METAL_SOURCES (files to compile), MF_METAL_IS_BRIDGE (TRUE when bridge.m is built) and
# MF_METAL_STUB_REASON (why not, for the stub).

set(MTLFLASH_METAL "AUTO" CACHE STRING "Metal bridge: ON, OFF or AUTO (AUTO falls back to a stub if bridge.m does not compile)")
set_property(CACHE MTLFLASH_METAL PROPERTY STRINGS AUTO ON OFF)
set(MTLFLASH_METAL_BRIDGE_SOURCE "${CMAKE_CURRENT_SOURCE_DIR}/csrc/metal/bridge.m" CACHE FILEPATH
    "The Objective-C bridge source (a test may point this at a broken copy)")
option(MTLFLASH_METAL_PROBE_ON_HOST "Run the AUTO compile probe on a non-Apple host too (testing)" OFF)
set(MTLFLASH_METAL_PROBE_FLAGS "" CACHE STRING "Extra flags for the probe compile (testing)")

string(TOUPPER "${MTLFLASH_METAL}" _mf_mode)
if(NOT _mf_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MTLFLASH_METAL must be ON, OFF or AUTO, got '${MTLFLASH_METAL}'")
endif()

set(MF_METAL_IS_BRIDGE FALSE)
set(MF_METAL_STUB_REASON "")

# Compiles the bridge to an object file with the flags the real build uses; sets ok and log.
# (OBJC is enabled by the caller: enable_language must run at file scope.)
function(_mf_probe_bridge ok_var log_var)
  if(NOT CMAKE_OBJC_COMPILER_LOADED)
    set(${ok_var} FALSE PARENT_SCOPE)
    set(${log_var} "no Objective-C compiler found" PARENT_SCOPE)
    return()
  endif()
  set(flags -x objective-c -fobjc-arc -c
            -I${CMAKE_CURRENT_SOURCE_DIR}/csrc -I${CMAKE_CURRENT_SOURCE_DIR})
  if(APPLE)
    if(CMAKE_OSX_SYSROOT)
      list(APPEND flags -isysroot "${CMAKE_OSX_SYSROOT}")
    endif()
    if(CMAKE_OSX_DEPLOYMENT_TARGET)
      list(APPEND flags "-mmacosx-version-min=${CMAKE_OSX_DEPLOYMENT_TARGET}")
    endif()
    foreach(a IN LISTS CMAKE_OSX_ARCHITECTURES)
      list(APPEND flags -arch "${a}")
    endforeach()
  endif()
  separate_arguments(user_flags UNIX_COMMAND "${CMAKE_OBJC_FLAGS}")
  list(APPEND flags ${user_flags} ${MTLFLASH_METAL_PROBE_FLAGS})
  set(obj "${CMAKE_CURRENT_BINARY_DIR}/mf_bridge_probe.o")
  execute_process(
    COMMAND "${CMAKE_OBJC_COMPILER}" ${flags} "${MTLFLASH_METAL_BRIDGE_SOURCE}" -o "${obj}"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(rc EQUAL 0)
    set(${ok_var} TRUE PARENT_SCOPE)
  else()
    set(${ok_var} FALSE PARENT_SCOPE)
  endif()
  set(${log_var} "${out}" PARENT_SCOPE)
endfunction()

if(_mf_mode STREQUAL "OFF")
  set(MF_METAL_STUB_REASON "disabled at build time (MTLFLASH_METAL=OFF)")
elseif(NOT APPLE AND NOT MTLFLASH_METAL_PROBE_ON_HOST)
  if(_mf_mode STREQUAL "ON")
    message(FATAL_ERROR "MTLFLASH_METAL=ON: the Metal bridge builds only for macOS")
  endif()
  set(MF_METAL_STUB_REASON "this build is not for macOS")
else()
  include(CheckLanguage)
  check_language(OBJC)
  if(CMAKE_OBJC_COMPILER)
    enable_language(OBJC)
  endif()
  _mf_probe_bridge(_mf_ok _mf_log)
  if(_mf_ok AND APPLE)
    set(MF_METAL_IS_BRIDGE TRUE)
    message(STATUS "mtlflash: Metal bridge: ${MTLFLASH_METAL_BRIDGE_SOURCE} compiles; building it")
  elseif(_mf_ok)
    set(MF_METAL_STUB_REASON "this build is not for macOS (the bridge probe compiled)")
    message(STATUS "mtlflash: Metal bridge probe compiled on this host; the stub is built (not macOS)")
  else()
    # The first line that says "error" (else the first line) is the reason users will see.
    string(REGEX MATCH "[^\n]*error[^\n]*" _mf_first "${_mf_log}")
    if(_mf_first STREQUAL "")
      string(REGEX MATCH "^[^\n]*" _mf_first "${_mf_log}")
    endif()
    string(REPLACE "${CMAKE_CURRENT_SOURCE_DIR}/" "" _mf_first "${_mf_first}")
    string(REPLACE "\"" "'" _mf_first "${_mf_first}")
    string(REPLACE "\\" "/" _mf_first "${_mf_first}")
    string(STRIP "${_mf_first}" _mf_first)
    string(SUBSTRING "${_mf_first}" 0 160 _mf_first)
    set(MF_METAL_STUB_REASON "bridge.m failed to compile at build time: ${_mf_first}")
    if(_mf_mode STREQUAL "ON")
      message(FATAL_ERROR "MTLFLASH_METAL=ON but the Metal bridge does not compile:\n${_mf_log}")
    endif()
    message(WARNING "mtlflash: the Metal bridge does not compile; building without Metal "
                    "(CPU backend only). Compiler output:\n${_mf_log}")
  endif()
endif()

if(MF_METAL_IS_BRIDGE)
  set(MF_METAL_SOURCES "${MTLFLASH_METAL_BRIDGE_SOURCE}")
  set_source_files_properties("${MTLFLASH_METAL_BRIDGE_SOURCE}" PROPERTIES COMPILE_OPTIONS "-fobjc-arc")
else()
  set(MF_METAL_SOURCES csrc/metal/bridge_stub.c)
  # The reason reaches the stub through a generated header (no shell quoting of a compiler message).
  string(REPLACE "\\" "\\\\" _mf_esc "${MF_METAL_STUB_REASON}")
  string(REPLACE "\"" "\\\"" _mf_esc "${_mf_esc}")
  file(WRITE "${CMAKE_CURRENT_BINARY_DIR}/mf_metal_stub_reason.h"
       "/* Generated by cmake/metal_bridge.cmake. */\n#define MF_METAL_STUB_REASON \"${_mf_esc}\"\n")
  set_source_files_properties(csrc/metal/bridge_stub.c PROPERTIES
                              COMPILE_DEFINITIONS MF_METAL_STUB_REASON_H=1
                              INCLUDE_DIRECTORIES "${CMAKE_CURRENT_BINARY_DIR}")
  message(STATUS "mtlflash: Metal backend not built: ${MF_METAL_STUB_REASON}")
endif()
