//! The micropod binary driven as a CNI plugin the way libcni drives one: exec'd with the `CNI_*`
//! environment and the network configuration on stdin, inside the lab's host namespace (where
//! runtimes run their plugins), with no arguments.

use std::{
    fs::File,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{micropod_bin, netlab::NetLab};

/// What one invocation gave: its exit status and stdout as JSON (`Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub success: bool,
    pub stdout: Value,
    pub stderr: String,
}

impl Answer {
    /// The spec's error code, if this is an error.
    pub fn code(&self) -> Option<u64> {
        (!self.success)
            .then(|| self.stdout["code"].as_u64())
            .flatten()
    }

    /// The error's message and details, for assertions on their wording.
    pub fn message(&self) -> String {
        format!(
            "{} {}",
            self.stdout["msg"].as_str().unwrap_or_default(),
            self.stdout["details"].as_str().unwrap_or_default()
        )
    }

    #[track_caller]
    pub fn ok(self) -> Value {
        assert!(
            self.success,
            "the plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    #[track_caller]
    pub fn err(self, code: u64) -> String {
        assert!(
            !self.success,
            "the plugin succeeded where error {code} was expected: {}",
            self.stdout
        );
        assert_eq!(
            self.code(),
            Some(code),
            "error code: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        assert_eq!(self.stderr, "", "an error goes to stdout only");
        self.message()
    }
}

/// The lab's network as a CNI configuration of `version`: its state and pin dirs, its subnet.
pub fn lab_conf(lab: &NetLab, version: &str, extra: Value) -> Value {
    let mut conf = json!({
        "cniVersion": version,
        "name": "mpt",
        "type": "micropod",
        "subnet": "10.10.0.0/24",
        "stateDir": lab.dirs.state,
        "bpfDir": lab.dirs.pins.join("micropod"),
    });
    for (k, v) in extra.as_object().expect("extra settings are an object") {
        conf[k] = v.clone();
    }
    conf
}

/// Runs the plugin binary with `vars` (`CNI_*` names and values; an empty value is passed as
/// an empty variable, as runtimes do for DEL's netns) and `conf` on stdin, in the lab's host.
pub fn exec(lab: &NetLab, vars: &[(&str, &str)], conf: &Value) -> Answer {
    exec_bin(lab, &micropod_bin(), vars, conf.to_string().as_bytes())
}

/// [`exec`] with raw stdin and any executable.
pub fn exec_bin(lab: &NetLab, bin: &Path, vars: &[(&str, &str)], stdin: &[u8]) -> Answer {
    exec_at(lab.host_file(), bin, vars, stdin)
}

/// [`exec_bin`] in the namespace open as `host` (another node's, say).
pub fn exec_at(host: &File, bin: &Path, vars: &[(&str, &str)], stdin: &[u8]) -> Answer {
    let mut child = plugin_command(host, bin, vars)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin)
        .expect("writing the configuration");
    answer(child.wait_with_output().expect("waiting for the plugin"))
}

/// The plugin with `stdin` as its standard input as is (a file, a directory), not a pipe.
pub fn exec_stdio(lab: &NetLab, vars: &[(&str, &str)], stdin: Stdio) -> Answer {
    let mut cmd = plugin_command(lab.host_file(), &micropod_bin(), vars);
    answer(cmd.stdin(stdin).output().expect("running the plugin"))
}

/// Starts the plugin with failpoint `point` armed, waits until it is frozen there and kills it
/// with SIGKILL (our own child, by PID), as a runtime's plugin may die at any step.
#[track_caller]
pub fn kill_at(lab: &NetLab, point: &str, vars: &[(&str, &str)], conf: &Value) {
    let mut child = plugin_command(lab.host_file(), &micropod_bin(), vars)
        .env(micropod::failpoint::ENV, point)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .expect("writing the configuration");
    crate::netlab::kill_at_failpoint(&mut child, &format!("the plugin ({vars:?})"), point);
}

/// `bin` as a runtime runs a plugin: nothing of this process's environment but `PATH`, the
/// `CNI_*` variables of `vars` (an empty value passed as an empty variable, as runtimes do for
/// DEL's netns), no arguments, in the namespace open as `host`.
fn plugin_command(host: &File, bin: &Path, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_PATH", "/opt/cni/bin");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    crate::netlab::in_netns(&mut cmd, host);
    cmd
}

/// What the plugin answered: its stdout must be JSON or empty.
fn answer(out: std::process::Output) -> Answer {
    let text = String::from_utf8(out.stdout).expect("utf-8 stdout");
    Answer {
        success: out.status.success(),
        stdout: if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text:?}"))
        },
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The address (without its prefix) of the first IP of an ADD's result.
#[track_caller]
pub fn result_ip(result: &Value) -> std::net::Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in the result {result}"))
}

/// The environment of one verb for one attachment.
pub fn env<'a>(
    command: &'a str,
    id: &'a str,
    netns: &'a str,
    ifname: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
    ]
}

/// `conf` with `prevResult` set, as runtimes send CHECK and DEL.
pub fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}
