//! Scratch directories for the tests of the store and of the crates above
//! it (feature `test-support`, which their dev-dependencies turn on; not in
//! the binaries): all under one directory per process, which is removed when the
//! process exits (the test harness ends through `exit`, which runs `atexit`
//! handlers), so passing and failing tests alike leave nothing in the
//! system's temp directory. A process killed by a signal leaves its one
//! directory, named for its pid; `WS_KEEP_TEST_DIRS=1` keeps it always (to
//! look at what a failing test left).

use std::path::PathBuf;
use std::sync::OnceLock;

static ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_root() {
    if let Some(root) = ROOT.get() {
        let _ = std::fs::remove_dir_all(root);
    }
}

/// The path of a directory named `name` for this process's tests: its
/// parent exists, it does not (anything left there by an earlier use of
/// the name is removed).
pub fn dir(name: &str) -> PathBuf {
    let root = ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("ws-tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the tests' scratch directory");
        if std::env::var_os("WS_KEEP_TEST_DIRS").is_none() {
            // SAFETY: registers a function that takes nothing and only
            // removes the directory; `atexit` is safe from any thread.
            unsafe {
                libc::atexit(remove_root);
            }
        }
        root
    });
    let d = root.join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}
