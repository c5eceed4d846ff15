#!/usr/bin/env bash
# Builds dsm in release mode and installs it into a prefix, for C, C++ and
# Fortran programs built with make, pkg-config or CMake:
#
#   PREFIX/bin/dsmexec, dsmwrap         the launcher (dsmexec finds dsmwrap beside it)
#   PREFIX/lib/libdsm.so.MAJOR.MINOR.PATCH, its soname link libdsm.so.MAJOR, libdsm.so
#   PREFIX/lib/libdsm.a
#   PREFIX/include/dsm.h                the C API (usable from C++)
#   PREFIX/include/dsm.f90, dsm.mod     the Fortran module, and PREFIX/lib/libdsmf.a
#                                       its procedures (built when gfortran exists)
#   PREFIX/lib/pkgconfig/dsm.pc         pkg-config --cflags --libs [--static] dsm
#   PREFIX/lib/pkgconfig/dsm-fortran.pc the same plus the Fortran module
#   PREFIX/lib/cmake/dsm/               find_package(dsm) -> target dsm::dsm
#
# Idempotent: running it again replaces the files it installed.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/install.sh --prefix DIR [--debug] [--with-deps]
       PREFIX=DIR scripts/install.sh

Builds dsm (cargo, release profile) and installs the launcher, libdsm
(shared, with a versioned soname, and static), dsm.h, the Fortran module,
a pkg-config file and a CMake package into DIR.

  --prefix DIR   where to install (or the PREFIX variable); created if missing
  --debug        install the debug build instead of the release build
  --with-deps    run scripts/install-deps.sh first (Debian/Ubuntu, apt via
                 sudo): libclang, rdma-core headers, a C compiler,
                 pkg-config, patchelf. Without it they must be there already.
  --no-deps      the default (kept for scripts that pass it)
  -h, --help     this text

Then, for example:
  export PKG_CONFIG_PATH=DIR/lib/pkgconfig
  gcc prog.c $(pkg-config --cflags --libs dsm) -o prog
  DIR/bin/dsmexec -n 4 ./prog
EOF
}

prefix="${PREFIX:-}"
profile=release
deps=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || { echo "install.sh: --prefix needs a directory" >&2; exit 2; }
              prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --debug) profile=debug; shift ;;
    --no-deps) deps=0; shift ;;
    --with-deps) deps=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$prefix" ]; then
  echo "install.sh: no prefix: give --prefix DIR (or PREFIX=DIR); see --help" >&2
  exit 2
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ "$deps" -eq 0 ] || scripts/install-deps.sh
command -v cargo >/dev/null || { echo "install.sh: cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
major="${version%%.*}"
cargo_profile=(--profile dev)
[ "$profile" = release ] && cargo_profile=(--release)
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
out="$target_dir/$profile"

echo "install.sh: building dsm $version ($profile)" >&2
cargo build "${cargo_profile[@]}" --quiet -p dsm --lib -p dsm-launcher --bins
# The system libraries a static libdsm.a needs (rustc's native-static-libs
# for this crate: its Rust standard library, and rdma-core's verbs).
static_libs="-libverbs -lrdmacm -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
install -d "$prefix/bin" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/dsm" "$prefix/include"
install -m 0755 "$out/dsmexec" "$out/dsmwrap" "$prefix/bin/"
install -m 0755 "$out/libdsm.so" "$prefix/lib/libdsm.so.$version"
# The soname programs record: a later compatible version can replace the file.
if command -v patchelf >/dev/null; then
  patchelf --set-soname "libdsm.so.$major" "$prefix/lib/libdsm.so.$version"
else
  echo "install.sh: no patchelf: libdsm.so has no soname (programs record libdsm.so); install patchelf or use --with-deps" >&2
fi
ln -sfn "libdsm.so.$version" "$prefix/lib/libdsm.so.$major"
ln -sfn "libdsm.so.$major" "$prefix/lib/libdsm.so"
install -m 0644 "$out/libdsm.a" "$prefix/lib/libdsm.a"
install -m 0644 include/dsm.h include/dsm.f90 "$prefix/include/"
if command -v gfortran >/dev/null; then
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  gfortran -O2 -fPIC -c -J "$prefix/include" -o "$scratch/dsm_fortran.o" include/dsm.f90
  rm -f "$prefix/lib/libdsmf.a"
  ar rcs "$prefix/lib/libdsmf.a" "$scratch/dsm_fortran.o"
  rm -rf "$scratch"
else
  echo "install.sh: no gfortran: the Fortran module was not built (compile include/dsm.f90 with your Fortran compiler)" >&2
fi

cat > "$prefix/lib/pkgconfig/dsm.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: dsm
Description: distributed shared memory for HPC jobs (start programs with \${prefix}/bin/dsmexec)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -ldsm
Libs.private: $static_libs
EOF

cat > "$prefix/lib/pkgconfig/dsm-fortran.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: dsm-fortran
Description: the Fortran module of dsm (use dsm)
Version: $version
Requires: dsm = $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -ldsmf
EOF

cat > "$prefix/lib/cmake/dsm/dsmConfig.cmake" <<'EOF'
# find_package(dsm): the imported target dsm::dsm (libdsm.so, dsm.h), and
# dsm_DSMEXEC, the launcher's path.
get_filename_component(_dsm_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET dsm::dsm)
  add_library(dsm::dsm SHARED IMPORTED)
  set_target_properties(dsm::dsm PROPERTIES
    IMPORTED_LOCATION "${_dsm_prefix}/lib/libdsm.so"
    IMPORTED_SONAME "libdsm.so.@MAJOR@"
    INTERFACE_INCLUDE_DIRECTORIES "${_dsm_prefix}/include")
endif()
set(dsm_DSMEXEC "${_dsm_prefix}/bin/dsmexec")
set(dsm_INCLUDE_DIRS "${_dsm_prefix}/include")
unset(_dsm_prefix)
EOF
sed -i "s/@MAJOR@/$major/" "$prefix/lib/cmake/dsm/dsmConfig.cmake"
cat > "$prefix/lib/cmake/dsm/dsmConfigVersion.cmake" <<EOF
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
EOF
echo "install.sh: installed dsm $version in $prefix" >&2
