//! The `micropod` command line: a thin layer over the library.

mod cli;

/// On musl (the static release build) dlmalloc instead of musl's malloc: see Cargo.toml.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
