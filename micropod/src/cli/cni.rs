//! The CNI plugin's entry (the binary run by a container runtime) and `micropod cni …`.

use std::{
    io::{Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
};

#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Install micropod as a CNI plugin: the binary as `micropod` in the runtimes' plugin
    /// dir, and an example configuration list (kept if one exists, unless --force).
    Install {
        /// Where runtimes look for plugins (containerd and podman: /opt/cni/bin).
        #[arg(long, default_value = micropod::cni::DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        /// Where runtimes look for network configurations.
        #[arg(long, default_value = micropod::cni::DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        /// Overwrite an existing example configuration list.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print the example configuration list.
    Example,
}

/// Whether this process was started by a runtime as a CNI plugin: `CNI_COMMAND` set and no
/// arguments (runtimes pass none; `micropod` itself always takes a command).
pub(super) fn is_plugin_invocation() -> bool {
    std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some()
}

/// The plugin: the configuration on stdin, the answer (or the spec's error) on stdout, logs
/// on stderr (`MICROPOD_LOG`, default `warn`).
pub(super) fn plugin() -> ExitCode {
    micropod::runtime::die_on_sigpipe();
    env_logger::Builder::new()
        .parse_filters(&std::env::var("MICROPOD_LOG").unwrap_or_else(|_| "warn".into()))
        .format_target(false)
        .init();
    let mut stdin = Vec::new();
    let reply = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => micropod::cni::run(
            &micropod::cni::Invocation::from_env(),
            &stdin,
            std::env::current_exe().ok().as_deref(),
        ),
        Err(e) => micropod::cni::io_error(e),
    };
    if let Some(out) = &reply.stdout {
        let mut stdout = std::io::stdout().lock();
        // Nothing to do if the runtime went away; the exit status still tells.
        let _ = writeln!(stdout, "{out}").and_then(|()| stdout.flush());
    }
    if reply.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub(super) fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Install {
            bin_dir,
            conf_dir,
            force,
            json,
        } => {
            let exe = std::env::current_exe()?;
            let done = micropod::cni::install(&exe, &bin_dir, &conf_dir, force).map_err(|e| {
                anyhow::anyhow!(
                    "cannot install the plugin into {} and {}: {e}",
                    bin_dir.display(),
                    conf_dir.display()
                )
            })?;
            if json {
                println!("{}", serde_json::to_string(&done)?);
            } else {
                println!("plugin      {}", done.plugin.display());
                match &done.conflist {
                    Some(path) => println!("conflist    {}", path.display()),
                    None => println!(
                        "conflist    kept the existing {} (--force replaces it)",
                        conf_dir.join(micropod::cni::EXAMPLE_CONFLIST).display()
                    ),
                }
            }
        }
        Command::Example => println!(
            "{}",
            serde_json::to_string_pretty(&micropod::cni::example_conflist())?
        ),
    }
    Ok(())
}
