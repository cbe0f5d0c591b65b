# Which CPU translation units a build compiles, decided by the TARGET of the build, never by the
# machine running CMake (an arm64 or universal2 build on an Intel Mac must not compile the AVX
# files for arm64).
#
#   mf_target_archs(<out>)   the architectures this build targets, normalised to x86_64 / arm64
#                            / <other>: CMAKE_OSX_ARCHITECTURES on Apple when set (one entry per
#                            slice of a universal binary), else CMAKE_SYSTEM_PROCESSOR.
#
# Used by CMakeLists.txt, and by tests/test_build_config.py in script mode:
#   cmake -DAPPLE=1 -DCMAKE_OSX_ARCHITECTURES="arm64;x86_64" -P cmake/target_arch.cmake
function(mf_target_archs out)
  if(APPLE AND NOT "${CMAKE_OSX_ARCHITECTURES}" STREQUAL "")
    set(raw ${CMAKE_OSX_ARCHITECTURES})
  else()
    set(raw "${CMAKE_SYSTEM_PROCESSOR}")
  endif()
  set(archs "")
  foreach(a IN LISTS raw)
    string(TOLOWER "${a}" a)
    if(a MATCHES "^(x86_64|amd64|x64|x86_64h)$")
      list(APPEND archs x86_64)
    elseif(a MATCHES "^(arm64|aarch64|arm64e)$")
      list(APPEND archs arm64)
    elseif(NOT a STREQUAL "")
      list(APPEND archs "${a}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES archs)
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  mf_target_archs(_archs)
  list(LENGTH _archs _n)
  if("x86_64" IN_LIST _archs AND _n GREATER 1)
    set(_x86 "x86_64 slice only")
  elseif("x86_64" IN_LIST _archs)
    set(_x86 "yes")
  else()
    set(_x86 "no")
  endif()
  message("target archs: ${_archs}; x86 SIMD units: ${_x86}")
endif()
