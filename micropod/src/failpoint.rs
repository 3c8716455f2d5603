//! Named points in multi-step commands where a test can freeze micropod and kill it.
//!
//! With `MICROPOD_FAILPOINT=<name>` in the environment, reaching that point prints
//! `micropod: failpoint <name>` on stderr and waits to be killed. Crash-safety tests use this to
//! `kill -9` a command at every step between two kernel changes, rather than hoping that a
//! timed kill lands there. Without the variable a hit costs one cached comparison.

use std::{sync::OnceLock, time::Duration};

/// The variable that arms a failpoint.
pub const ENV: &str = "MICROPOD_FAILPOINT";

/// Freezes here (until killed) if `name` is the armed failpoint.
pub fn hit(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    if ARMED.get_or_init(|| std::env::var(ENV).ok()).as_deref() == Some(name) {
        #[expect(
            clippy::print_stderr,
            reason = "the test waiting for the failpoint reads this line"
        )]
        {
            eprintln!("micropod: failpoint {name}");
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}
