# Helpers shared by every CMakeLists.txt of the project.

# kms_sources_check(DIR <dir> GLOB <pattern> LISTED <file>...)
# Source lists are explicit; this makes forgetting one a configure error
# instead of a module or test that silently is not built: every file in DIR
# matching GLOB must appear in LISTED (names relative to DIR).
function(kms_sources_check)
  cmake_parse_arguments(A "" "DIR;GLOB" "LISTED" ${ARGN})
  file(GLOB present RELATIVE ${A_DIR} CONFIGURE_DEPENDS ${A_DIR}/${A_GLOB})
  foreach(f ${present})
    list(FIND A_LISTED ${f} i)
    if(i EQUAL -1)
      message(FATAL_ERROR "${A_DIR}/${f} is not in any source list of "
        "${A_DIR}/CMakeLists.txt: add it (or delete the file)")
    endif()
  endforeach()
  foreach(f ${A_LISTED})
    if(NOT EXISTS ${A_DIR}/${f})
      message(FATAL_ERROR "${A_DIR}/CMakeLists.txt lists ${f}, which does not exist")
    endif()
  endforeach()
endfunction()

# kms_go_binary(<name> [DEPENDS <file>...])
# Builds the Go program in the current source directory (main.go) offline in
# GOPATH mode from Debian's golang-*-dev packages (/usr/share/gocode) into
# the current binary directory; target <name> is part of ALL.
function(kms_go_binary name)
  cmake_parse_arguments(A "" "" "DEPENDS" ${ARGN})
  set(bin ${CMAKE_CURRENT_BINARY_DIR}/${name})
  add_custom_command(
    OUTPUT ${bin}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${CMAKE_CURRENT_BINARY_DIR}/gopath
    COMMAND env GO111MODULE=off
            GOPATH=${CMAKE_CURRENT_BINARY_DIR}/gopath:/usr/share/gocode
            GOCACHE=${CMAKE_CURRENT_BINARY_DIR}/gocache
            GOFLAGS= GOPROXY=off CGO_ENABLED=0
            ${GO_EXECUTABLE} build -o ${bin} .
    WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}
    DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/main.go ${A_DEPENDS}
    COMMENT "go build ${name}"
    VERBATIM)
  add_custom_target(${name} ALL DEPENDS ${bin})
endfunction()
