//! An installed dsm as C, C++ and Fortran users meet it (issue 24):
//! `scripts/install.sh --prefix P`, then programs built with nothing but
//! pkg-config (or CMake's `find_package`) against P, run by P/bin/dsmexec
//! from another directory, computing exact results.
//!
//! The install uses the debug build the test run already has (`--debug`).
//! A missing compiler (g++, gfortran, cmake) skips its test
//! with a SKIPPED line, or fails it with DSM_TEST_REQUIRE_TOOLCHAINS=1 (as
//! `scripts/test.sh` sets, having installed them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use dsm_tests::{run, scratch_dir, short_hostname, unique_token, Finished};

const LIMIT: Duration = Duration::from_secs(120);
const RANKS: usize = 3;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn required() -> bool {
    std::env::var("DSM_TEST_REQUIRE_TOOLCHAINS").is_ok_and(|v| v == "1")
}

/// Whether `tool` runs here; if not, says the test is skipped (or fails
/// it when toolchains are required).
fn have(tool: &str, test: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !required(),
            "{tool} is missing and DSM_TEST_REQUIRE_TOOLCHAINS=1"
        );
        eprintln!("SKIPPED: install::{test}: {tool} is not installed");
    }
    found
}

/// The prefix dsm is installed in, once for the whole test binary. It lives
/// in cargo's temporary directory under one name, replaced by each run: a
/// debug installation is 300 MB, too much to leave one per run in /tmp.
fn prefix() -> &'static Path {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("install-test-prefix");
        let _ = std::fs::remove_dir_all(&prefix);
        // Twice: installing again over an installation must work.
        for _ in 0..2 {
            let out = Command::new(repo_root().join("scripts/install.sh"))
                .args(["--debug", "--prefix"])
                .arg(&prefix)
                .output()
                .expect("run scripts/install.sh");
            assert!(
                out.status.success(),
                "install.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        prefix
    })
}

/// `pkg-config ARGS` against the installed prefix only, as words.
fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .env("PKG_CONFIG_PATH", prefix().join("lib/pkgconfig"))
        .output()
        .expect("run pkg-config");
    assert!(
        out.status.success(),
        "pkg-config {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn build(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `program` on RANKS ranks with the installed dsmexec, from a
/// directory that is neither the repository nor the program's.
fn run_installed(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let elsewhere = scratch_dir(&unique_token("elsewhere"));
    let mut command = Command::new(prefix().join("bin/dsmexec"));
    command
        .args(["-n", &RANKS.to_string()])
        .arg(program)
        .args(args)
        .current_dir(&elsewhere)
        .envs(env.iter().copied());
    let out = run(command, LIMIT);
    let _ = std::fs::remove_dir_all(&elsewhere);
    out
}

/// examples/c/api.c's verdict: every rank counted the exact total.
fn expect_exact_counters(out: &Finished) {
    assert_eq!(out.code, Some(0), "{out:?}");
    let host = short_hostname();
    let total = RANKS * 200;
    for rank in 0..RANKS {
        assert_eq!(
            out.lines_of(rank, &host, "stdout"),
            [format!("rank {rank}: total {total} of {total}, mine 400")],
            "{out:?}"
        );
    }
}

#[test]
fn the_prefix_holds_the_launcher_the_library_the_header_and_the_build_files() {
    let prefix = prefix();
    for file in [
        "bin/dsmexec",
        "bin/dsmwrap",
        "lib/libdsm.so",
        "lib/libdsm.so.0",
        "lib/libdsm.a",
        "include/dsm.h",
        "include/dsm.f90",
        "lib/pkgconfig/dsm.pc",
        "lib/pkgconfig/dsm-fortran.pc",
        "lib/cmake/dsm/dsmConfig.cmake",
        "lib/cmake/dsm/dsmConfigVersion.cmake",
    ] {
        assert!(prefix.join(file).exists(), "{file} is not installed");
    }
    let soname = Command::new("patchelf")
        .arg("--print-soname")
        .arg(prefix.join("lib/libdsm.so"))
        .output()
        .expect("patchelf");
    assert_eq!(
        String::from_utf8_lossy(&soname.stdout).trim(),
        "libdsm.so.0"
    );
    let static_libs = pkg_config(&["--static", "--libs", "dsm"]);
    assert!(
        static_libs.iter().any(|w| w == "-libverbs"),
        "Libs.private: {static_libs:?}"
    );

    let script = repo_root().join("scripts/install.sh");
    let help = Command::new(&script)
        .arg("--help")
        .output()
        .expect("--help");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--prefix DIR"));
    let bare = Command::new(&script)
        .env_remove("PREFIX")
        .output()
        .expect("no prefix");
    assert_eq!(bare.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("no prefix"));
}

#[test]
fn a_c_program_built_with_pkg_config_alone_runs_under_the_installed_dsmexec() {
    let dir = scratch_dir(&unique_token("cuser"));
    let program = dir.join("api");
    let mut cc = Command::new("gcc");
    cc.arg(repo_root().join("examples/c/api.c"))
        .args(pkg_config(&["--cflags", "--libs", "dsm"]))
        .arg("-o")
        .arg(&program);
    build(cc, "gcc with pkg-config");
    expect_exact_counters(&run_installed(&program, &[], &[]));

    // Statically linked: libdsm.a and Libs.private, no libdsm.so needed.
    let static_program = dir.join("api_static");
    let libs: Vec<String> = pkg_config(&["--static", "--libs-only-l", "dsm"])
        .into_iter()
        .filter(|w| w != "-ldsm")
        .collect();
    let mut cc = Command::new("gcc");
    cc.arg(repo_root().join("examples/c/api.c"))
        .args(pkg_config(&["--cflags", "dsm"]))
        .arg(prefix().join("lib/libdsm.a"))
        .args(libs)
        .arg("-o")
        .arg(&static_program);
    build(cc, "gcc, static");
    let ldd = Command::new("ldd")
        .arg(&static_program)
        .output()
        .expect("ldd");
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("libdsm"),
        "the static program still needs libdsm.so"
    );
    expect_exact_counters(&run_installed(&static_program, &[], &[]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_program_compiled_as_cpp_by_gxx_runs() {
    if !have("g++", "the_same_program_compiled_as_cpp_by_gxx_runs") {
        return;
    }
    let dir = scratch_dir(&unique_token("cppuser"));
    let program = dir.join("api_cpp");
    let mut cxx = Command::new("g++");
    cxx.args(["-x", "c++", "-Wall", "-Werror"])
        .arg(repo_root().join("examples/c/api.c"))
        .args(pkg_config(&["--cflags", "--libs", "dsm"]))
        .arg("-o")
        .arg(&program);
    build(cxx, "g++ with pkg-config");
    expect_exact_counters(&run_installed(&program, &[], &[]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cmake_find_package_gives_the_dsm_dsm_target() {
    if !have("cmake", "cmake_find_package_gives_the_dsm_dsm_target") {
        return;
    }
    let dir = scratch_dir(&unique_token("cmakeuser"));
    std::fs::write(
        dir.join("CMakeLists.txt"),
        format!(
            "cmake_minimum_required(VERSION 3.13)\nproject(dsm_user C)\nfind_package(dsm 0.1 REQUIRED)\nadd_executable(api {})\ntarget_link_libraries(api dsm::dsm)\n",
            repo_root().join("examples/c/api.c").display()
        ),
    )
    .expect("CMakeLists.txt");
    let mut configure = Command::new("cmake");
    configure
        .args(["-S", ".", "-B", "build"])
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix().display()))
        .current_dir(&dir);
    build(configure, "cmake configure");
    let mut make = Command::new("cmake");
    make.args(["--build", "build"]).current_dir(&dir);
    build(make, "cmake --build");
    expect_exact_counters(&run_installed(&dir.join("build/api"), &[], &[]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fortran_jacobi_through_the_dsm_module_matches_the_serial_run() {
    if !have(
        "gfortran",
        "a_fortran_jacobi_through_the_dsm_module_matches_the_serial_run",
    ) {
        return;
    }
    let dir = scratch_dir(&unique_token("fortranuser"));
    let program = dir.join("jacobi");
    let mut fc = Command::new("gfortran");
    fc.arg(repo_root().join("examples/fortran/jacobi.f90"))
        .args(pkg_config(&["--cflags", "--libs", "dsm-fortran"]))
        .arg("-o")
        .arg(&program)
        .current_dir(&dir);
    build(fc, "gfortran with pkg-config");
    let out = run_installed(&program, &["192", "25"], &[("DSM_SPACE_SIZE", "16M")]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = out.lines_of(0, &short_hostname(), "stdout");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("jacobi 192x192, 25 sweeps: checksum ")
                && l.ends_with(" equals the serial run")),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
