//! The C API of `include/dsm.h`. One shared space per process, kept in a
//! global between `dsm_init` and `dsm_finalize`.

use std::ffi::{c_char, c_int, c_void};
use std::sync::RwLock;

use crate::Dsm;

static DSM: RwLock<Option<Dsm>> = RwLock::new(None);

fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("{what}: {err}");
    std::process::exit(1)
}

fn with_dsm<T>(what: &str, f: impl FnOnce(&Dsm) -> T) -> T {
    let guard = DSM.read().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(dsm) => f(dsm),
        None => fail(what, "dsm_init has not been called"),
    }
}

/// Joins the job; returns the base of the shared space. Exits the process
/// with a message naming the problem when that is impossible.
#[no_mangle]
pub extern "C" fn dsm_init(_argc: c_int, _argv: *mut *mut c_char) -> *mut c_void {
    let mut guard = DSM.write().unwrap_or_else(|p| p.into_inner());
    if let Some(dsm) = guard.as_ref() {
        return dsm.base() as *mut c_void;
    }
    match crate::init_from_env() {
        Ok(dsm) => {
            let base = dsm.base() as *mut c_void;
            *guard = Some(dsm);
            base
        }
        Err(e) => fail("dsm_init", e),
    }
}

#[no_mangle]
pub extern "C" fn dsm_finalize() {
    let dsm = DSM.write().unwrap_or_else(|p| p.into_inner()).take();
    match dsm {
        Some(dsm) => {
            if let Err(e) = dsm.finalize() {
                fail("dsm_finalize", e)
            }
        }
        None => fail("dsm_finalize", "dsm_init has not been called"),
    }
}

#[no_mangle]
pub extern "C" fn dsm_rank() -> c_int {
    with_dsm("dsm_rank", |d| d.rank() as c_int)
}

#[no_mangle]
pub extern "C" fn dsm_size() -> c_int {
    with_dsm("dsm_size", |d| d.size() as c_int)
}

#[no_mangle]
pub extern "C" fn dsm_barrier() {
    with_dsm("dsm_barrier", |d| {
        if let Err(e) = d.barrier() {
            fail("dsm_barrier", e)
        }
    })
}
