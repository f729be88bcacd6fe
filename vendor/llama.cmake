# vendor/llama.cmake: obtain the pinned llama.cpp source and link it into inferd._fast._llama.
#
# Why this shape (vendor/README.md, DESIGN.md "Vendored llama.cpp"):
# * No third-party source is committed. The llama-cpp-python sdist of a pinned version
#   carries llama.cpp at vendor/llama.cpp; we fetch it with the machine's own pip (so the
#   configured index, mirrors and proxies apply; no registry host appears here), check
#   its sha256, and extract only the llama.cpp subtree.
# * libllama + ggml are built static, PIC, with hidden visibility and linked into the one
#   Cython module, so the wheel carries no shared libraries and exports no llama symbols.
# * CMAKE_ARGS (e.g. -DGGML_CUDA=on, -DGGML_METAL=on) pass straight through to ggml.

set(INFERD_LLAMA_PIN_PACKAGE "llama-cpp-python")
set(INFERD_LLAMA_PIN_VERSION "0.3.36")
set(INFERD_LLAMA_PIN_SHA256 "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")

if(NOT CMAKE_SCRIPT_MODE_FILE)
  set(INFERD_LLAMA_CPP_DIR "" CACHE PATH
      "Build against this llama.cpp checkout instead of the pinned, downloaded source")
endif()

set(_inferd_vendor_dir ${CMAKE_CURRENT_LIST_DIR})
set(_inferd_llama_extracted ${_inferd_vendor_dir}/llama.cpp)
set(_inferd_llama_stamp ${_inferd_llama_extracted}/.inferd-sha256)

function(_inferd_fetch_llama_cpp)
  set(dl ${_inferd_vendor_dir}/_download)
  set(sdist ${dl}/llama_cpp_python-${INFERD_LLAMA_PIN_VERSION}.tar.gz)
  if(NOT EXISTS ${sdist})
    message(STATUS "inferd: fetching ${INFERD_LLAMA_PIN_PACKAGE}==${INFERD_LLAMA_PIN_VERSION} "
                   "sdist with pip (carries llama.cpp)")
    file(MAKE_DIRECTORY ${dl})
    # --no-build-isolation: pip would otherwise build the sdist's own build requirements
    # from source just to read its metadata (>10 minutes instead of seconds).
    execute_process(
      COMMAND ${Python_EXECUTABLE} -m pip download --no-deps --no-binary=:all:
              --no-build-isolation
              ${INFERD_LLAMA_PIN_PACKAGE}==${INFERD_LLAMA_PIN_VERSION} -d ${dl}
      RESULT_VARIABLE rc
      OUTPUT_VARIABLE out
      ERROR_VARIABLE err)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR
        "inferd: pip could not download ${INFERD_LLAMA_PIN_PACKAGE}==${INFERD_LLAMA_PIN_VERSION}"
        " (exit ${rc}).\n${err}\nCheck the package index configuration of this Python "
        "(pip config list), or pass -DINFERD_LLAMA_CPP_DIR=/path/to/llama.cpp.")
    endif()
    file(GLOB found ${dl}/llama_cpp_python-${INFERD_LLAMA_PIN_VERSION}.tar.gz
                    ${dl}/llama-cpp-python-${INFERD_LLAMA_PIN_VERSION}.tar.gz)
    list(LENGTH found n)
    if(n EQUAL 0)
      message(FATAL_ERROR "inferd: pip finished but no sdist is in ${dl}")
    endif()
    list(GET found 0 got)
    if(NOT got STREQUAL sdist)
      file(RENAME ${got} ${sdist})
    endif()
  endif()

  file(SHA256 ${sdist} actual)
  if(NOT actual STREQUAL INFERD_LLAMA_PIN_SHA256)
    file(REMOVE ${sdist})
    message(FATAL_ERROR
      "inferd: sha256 mismatch for ${sdist}:\n  expected ${INFERD_LLAMA_PIN_SHA256}\n"
      "  got      ${actual}\nThe file was removed; the index served something other than "
      "the pinned release. Refusing to build it.")
  endif()

  set(tmp ${dl}/extract)
  file(REMOVE_RECURSE ${tmp})
  file(ARCHIVE_EXTRACT INPUT ${sdist} DESTINATION ${tmp} PATTERNS "*/vendor/llama.cpp/*")
  file(GLOB top LIST_DIRECTORIES true ${tmp}/*)
  list(GET top 0 top)
  if(NOT EXISTS ${top}/vendor/llama.cpp/CMakeLists.txt)
    message(FATAL_ERROR "inferd: ${sdist} has no vendor/llama.cpp/CMakeLists.txt")
  endif()
  file(REMOVE_RECURSE ${_inferd_llama_extracted})
  file(RENAME ${top}/vendor/llama.cpp ${_inferd_llama_extracted})
  file(REMOVE_RECURSE ${tmp})
  # The stamp is written last: a half-finished extraction is never mistaken for a cache.
  file(WRITE ${_inferd_llama_stamp} "${INFERD_LLAMA_PIN_SHA256}\n")
endfunction()

# Script mode (`cmake -DPython_EXECUTABLE=... -P vendor/llama.cmake`): only obtain and
# verify the source. bench/peers.py uses this to build llama.cpp's own tools from the
# very same tree.
if(CMAKE_SCRIPT_MODE_FILE)
  set(_stamp "")
  if(EXISTS ${_inferd_llama_stamp})
    file(STRINGS ${_inferd_llama_stamp} _stamp LIMIT_COUNT 1)
  endif()
  if(NOT _stamp STREQUAL INFERD_LLAMA_PIN_SHA256)
    _inferd_fetch_llama_cpp()
  endif()
  message(STATUS "inferd: pinned llama.cpp is in ${_inferd_llama_extracted}")
  return()
endif()

if(INFERD_LLAMA_CPP_DIR)
  set(INFERD_LLAMA_SOURCE ${INFERD_LLAMA_CPP_DIR})
  message(STATUS "inferd: using llama.cpp from INFERD_LLAMA_CPP_DIR=${INFERD_LLAMA_CPP_DIR}")
else()
  set(_stamp "")
  if(EXISTS ${_inferd_llama_stamp})
    file(STRINGS ${_inferd_llama_stamp} _stamp LIMIT_COUNT 1)
  endif()
  if(NOT _stamp STREQUAL INFERD_LLAMA_PIN_SHA256)
    _inferd_fetch_llama_cpp()
  else()
    message(STATUS "inferd: using cached pinned llama.cpp in ${_inferd_llama_extracted}")
  endif()
  set(INFERD_LLAMA_SOURCE ${_inferd_llama_extracted})
endif()
if(NOT EXISTS ${INFERD_LLAMA_SOURCE}/include/llama.h)
  message(FATAL_ERROR "inferd: ${INFERD_LLAMA_SOURCE} does not look like llama.cpp "
                      "(no include/llama.h)")
endif()

# llama.cpp options: a library only. These are cache variables in llama.cpp; setting them
# as normal variables first (policy CMP0077) makes our choice win unless the user passes
# -D explicitly on the command line or via CMAKE_ARGS.
set(CMAKE_POLICY_DEFAULT_CMP0077 NEW)
function(_inferd_default var value)
  if(NOT DEFINED CACHE{${var}})
    set(${var} ${value} CACHE BOOL "set by inferd vendor/llama.cmake")
  endif()
endfunction()
_inferd_default(LLAMA_BUILD_COMMON OFF)
_inferd_default(LLAMA_BUILD_TOOLS OFF)
_inferd_default(LLAMA_BUILD_TESTS OFF)
_inferd_default(LLAMA_BUILD_EXAMPLES OFF)
_inferd_default(LLAMA_BUILD_SERVER OFF)
_inferd_default(LLAMA_CURL OFF)
_inferd_default(LLAMA_ALL_WARNINGS OFF)
# ggml's RPC backend: lets a model's layers live on `inferd rpc-worker` / llama.cpp
# `rpc-server` processes on other hosts (docs/adr/0019-rpc-backend.md). Measured cost on a
# 2-core box: ~70-106 KB of the 6.9 MB module, ~16 s of an ~850 s serial build (1-2 %).
# -DGGML_RPC=OFF (CMAKE_ARGS) leaves it out; the binding then refuses RPC clearly.
_inferd_default(GGML_RPC ON)
# libmtmd (tools/mtmd: images and audio through a projector, docs/adr/0028-media-through-libmtmd.md)
# is built static and PIC like libllama and linked into _llama; llama.cpp's
# LLAMA_BUILD_MTMD builds the library alone, without mtmd-cli or common. FORCE because an
# existing build tree already caches llama.cpp's OFF default. Video (ffmpeg in a
# subprocess) stays out. Measured cost on a loaded 2-core box: the module grows from 6.9 MB
# to 8.7 MB; the rebuild that added it took ~4.5 CPU-minutes (mtmd's ~50 sources, clip.cpp
# the largest, plus the Cython module).
set(LLAMA_BUILD_MTMD ON CACHE BOOL "set by inferd vendor/llama.cmake" FORCE)
set(MTMD_VIDEO OFF CACHE BOOL "set by inferd vendor/llama.cmake" FORCE)
# Tuned for the machine that builds it. Wheels for distribution must pass
# -DGGML_NATIVE=OFF (and pick CPU variants), or they crash on older CPUs.
_inferd_default(GGML_NATIVE ON)
find_program(INFERD_CCACHE ccache)
if(INFERD_CCACHE)
  _inferd_default(GGML_CCACHE ON)
else()
  _inferd_default(GGML_CCACHE OFF)
endif()

# INFERD_LLAMA_SHARED=ON builds libllama + ggml as shared libraries in this build tree
# (next to llama.cpp's tools when -DLLAMA_BUILD_TOOLS=ON) instead of linking them into
# the module. Why: on a GPU host one CUDA compile of ggml (minutes even on many cores)
# then serves inferd, llama-server/llama-bench and ctypes bindings such as
# llama-cpp-python (LLAMA_CPP_LIB_PATH) alike, as bench/gpu/run.sh does. The module
# finds the libraries through the build tree's RPATH, so this is for build-tree use,
# not for wheels.
option(INFERD_LLAMA_SHARED "Link _llama against shared libllama/ggml (build-tree use)" OFF)
set(_inferd_saved_shared ${BUILD_SHARED_LIBS})
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
if(INFERD_LLAMA_SHARED)
  set(BUILD_SHARED_LIBS ON)
else()
  set(BUILD_SHARED_LIBS OFF)
  set(CMAKE_C_VISIBILITY_PRESET hidden)
  set(CMAKE_CXX_VISIBILITY_PRESET hidden)
  set(CMAKE_VISIBILITY_INLINES_HIDDEN ON)
endif()
add_subdirectory(${INFERD_LLAMA_SOURCE} ${CMAKE_CURRENT_BINARY_DIR}/llama.cpp EXCLUDE_FROM_ALL)
set(BUILD_SHARED_LIBS ${_inferd_saved_shared})

inferd_cython_module(_llama CXX)
target_link_libraries(_llama PRIVATE mtmd llama ggml)
# _rpc.pxi includes inferd_rpc.h, which stands in for ggml-rpc when GGML_RPC is OFF.
target_include_directories(_llama PRIVATE ${INFERD_FAST_DIR})
if(NOT GGML_RPC)
  target_compile_definitions(_llama PRIVATE INFERD_NO_RPC)
endif()
target_compile_features(_llama PRIVATE cxx_std_17)
