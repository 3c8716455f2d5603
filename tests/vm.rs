//! VMs end to end: `micropod run` boots the test guest (`cargo xtask guest`) under QEMU in a
//! lab's "host" namespace; traffic goes between the host, the guests and the lab's "internet".
//! Every VM a test starts is killed by the lab's guard (by pid and start time) however the
//! test ends.
//!
//! The tests take turns (one lock): each boots VMs under TCG on a small machine, and the
//! timings they check (release within 2 s) should not depend on what the others boot.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Mutex,
    time::{Duration, Instant},
};

use micropod::vm::{ProcessRef, VmState};
use micropod_tests::{
    netlab::{SERVER_ADDR, UPLINK_ADDR, ip_json, query, snapshot},
    vmlab::{HttpServer, VmLab, http_get_retry},
};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const BOOT: Duration = Duration::from_secs(90);
const READY: &str = "micropod-guest: ready";

fn ip_of(run: &Value) -> Ipv4Addr {
    run["ip"]
        .as_str()
        .expect("ip")
        .parse()
        .expect("an IPv4 address")
}

fn pid_of(value: &Value, key: &str) -> ProcessRef {
    let pid = u32::try_from(value[key].as_u64().expect(key)).expect("pid");
    ProcessRef::of(pid).expect("the process runs")
}

/// Polls `done` every 10 ms; returns how long it took, or panics after `timeout`.
#[track_caller]
fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// The VM's `ps --all --json` entry.
fn ps_entry(lab: &VmLab, name: &str) -> Value {
    lab.net
        .json(["ps", "--all", "--json"])
        .as_array()
        .expect("ps list")
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in ps --all"))
}

/// Boots the guest, fetches its page from the host, lets it fetch a page from the internet
/// through NAT, stops it and checks that its TAP and address are released. `datapath` is
/// what `network up --datapath` gets.
fn end_to_end(datapath: &str) {
    let _serial = serial();
    let lab = VmLab::new(&format!("vm-e2e-{datapath}"), datapath);
    let server = HttpServer::start(
        &lab.net.internet,
        SocketAddrV4::new(SERVER_ADDR, 80),
        "hello from the internet\n",
    );
    let started = Instant::now();
    let run = lab.run_vm(
        "web",
        &[
            "--cmdline",
            &format!("micropod.fetch=http://{SERVER_ADDR}/"),
        ],
    );
    let returned = started.elapsed();
    assert_eq!(run["state"], "running");
    assert_eq!(run["name"], "web");
    let ip = ip_of(&run);
    let tap = run["tap"].as_str().expect("tap").to_owned();
    assert_eq!(ip, Ipv4Addr::new(10, 10, 0, 2), "first free address");
    assert_eq!(run["mac"], "02:6d:0a:0a:00:02");
    assert!(lab.link_exists(&tap), "TAP {tap} exists");
    assert_eq!(lab.endpoint_names(), ["web"]);
    let record = lab.inspect("web");
    let cmdline = record["spec"]["cmdline"].as_str().expect("cmdline");
    assert!(
        cmdline.starts_with("console=ttyS0 ip=10.10.0.2::10.10.0.1:255.255.255.0::eth0:off"),
        "{cmdline}"
    );
    assert!(cmdline.ends_with(&format!("micropod.fetch=http://{SERVER_ADDR}/")));
    assert_eq!(record["vmm_alive"], true);
    assert_eq!(record["supervisor_alive"], true);

    let console = lab.wait_console("web", READY, BOOT);
    assert!(console.contains(&format!("{READY} ip={ip}")), "{console}");
    let booted = started.elapsed();

    // Host -> guest: the guest's httpd over the bridge.
    let page = http_get_retry(
        &lab.net.host,
        SocketAddrV4::new(ip, 80),
        Duration::from_secs(20),
    );
    assert_eq!(page.trim(), format!("micropod-guest micropod-guest {ip}"));

    // Guest -> internet: through NAT (the internet has no route back to the VM subnet), so
    // the server sees the uplink's address.
    let console = lab.wait_console("web", "micropod-guest: fetch ", Duration::from_secs(60));
    assert!(
        console.contains("micropod-guest: fetch ok 24"),
        "the guest could not fetch from the internet:\n{console}"
    );
    let peers = server.peers();
    assert!(!peers.is_empty(), "the server saw no request");
    assert!(
        peers
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(UPLINK_ADDR)),
        "requests come from the uplink address after NAT: {peers:?}"
    );
    // The per-VM counters saw both exchanges (eBPF), or say there are none (netfilter).
    let stats = lab.net.json(["stats", "web", "--json"]);
    assert_eq!(stats["datapath"], datapath, "{stats}");
    let web = &stats["endpoints"][0];
    assert_eq!(web["name"], "web");
    if datapath == "ebpf" {
        let n = |f: &str| web[f].as_u64().unwrap_or_else(|| panic!("{f} in {web}"));
        // At least the page to the host and the fetch: a handshake, a request, an answer and
        // a close each way.
        assert!(n("tx_packets") >= 8 && n("rx_packets") >= 8, "{web}");
        assert!(n("tx_bytes") > 24 && n("rx_bytes") > 24, "{web}");
        assert_eq!(
            web["drops"]["spoofed_mac"], 0,
            "the guest uses its endpoint's MAC"
        );
        assert_eq!(web["drops"]["spoofed_ip"], 0);
        let nat = &stats["nat"];
        assert!(
            nat["flows_created"].as_u64().unwrap() >= 1,
            "the fetch took the eBPF SNAT: {nat}"
        );
    } else {
        assert!(
            web.get("rx_packets").is_none(),
            "no counters on netfilter: {web}"
        );
    }
    // The exporter labels the VM's series with its name.
    let exposition = lab.net.ok(["metrics", "print"]);
    let labels = format!("{{endpoint=\"web\",ip=\"{ip}\",kind=\"tap\",vm=\"web\"");
    assert!(
        exposition.contains(&format!(
            "micropod_endpoint_info{labels},link=\"{tap}\"}} 1\n"
        )),
        "{exposition}"
    );
    if datapath == "ebpf" {
        let tx: u64 = exposition
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "micropod_endpoint_transmit_packets_total{labels}}} "
                ))
            })
            .unwrap_or_else(|| panic!("the VM's transmit counter in {exposition}"))
            .parse()
            .unwrap();
        assert!(tx >= 8, "{tx}");
    }

    // Stop: graceful (QMP system_powerdown -> the guest's acpid -> poweroff).
    let stop_started = Instant::now();
    let out = lab.net.ok(["stop", "web", "--timeout", "30"]);
    let stopped_in = stop_started.elapsed();
    assert_eq!(
        out.trim(),
        "stopped web",
        "the guest powered off when asked"
    );
    assert!(lab.endpoint_names().is_empty(), "endpoint released");
    assert!(!lab.link_exists(&tap), "TAP {tap} deleted");
    assert!(
        lab.net
            .json(["ps", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let entry = ps_entry(&lab, "web");
    assert_eq!(entry["state"], "exited");
    assert_eq!(entry["exit"]["code"], 0, "{entry}");
    assert_eq!(entry["exit"]["reason"], "stopped (exit code 0)");
    let console = lab.console("web");
    assert!(
        console.contains("micropod-guest: powering off"),
        "{console}"
    );

    // Its address is free again: the next VM gets it.
    lab.net.ok(["rm", "web"]);
    assert!(lab.records().is_empty());
    eprintln!(
        "e2e ({datapath}): run returned in {returned:?}, ready after {booted:?}, stop took {stopped_in:?}"
    );
}

#[test]
fn end_to_end_netfilter() {
    end_to_end("netfilter");
}

#[test]
fn end_to_end_ebpf() {
    end_to_end("ebpf");
}

/// `kill -9` of the VMM: the supervisor releases the endpoint within 2 s.
#[test]
fn vmm_killed_releases_endpoint_within_2s() {
    let _serial = serial();
    let lab = VmLab::new("vm-kill", "ebpf");
    let run = lab.run_vm("victim", &[]);
    let tap = run["tap"].as_str().expect("tap").to_owned();
    let vmm = pid_of(&run, "pid");
    assert!(lab.link_exists(&tap));

    // `logs -f` follows until the VM exits.
    let mut follow = lab
        .net
        .micropod(["logs", "-f", "victim"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("micropod logs -f");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f keeps following"
    );

    assert!(vmm.signal(nix::libc::SIGKILL).expect("kill -9 the VMM"));
    let took = wait_for("endpoint released", Duration::from_secs(2), || {
        lab.records()
            .first()
            .is_some_and(|r| r.state == VmState::Exited && r.network.released)
    });
    assert!(!lab.link_exists(&tap), "TAP deleted");
    assert!(lab.endpoint_names().is_empty());
    let entry = ps_entry(&lab, "victim");
    assert_eq!(entry["exit"]["signal"], 9, "{entry}");
    assert_eq!(entry["exit"]["reason"], "killed by signal 9");
    eprintln!("released {took:?} after kill -9 of the VMM");
    wait_for("logs -f ends with the VM", Duration::from_secs(2), || {
        follow.try_wait().unwrap().is_some()
    });
    assert!(follow.wait().unwrap().success());

    // The name stays taken until rm; after rm it can be used again and gets the address back.
    let again = lab.run_command("victim", &[]).output().unwrap();
    assert!(!again.status.success());
    lab.net.ok(["rm", "victim"]);
    let run = lab.run_vm("victim", &[]);
    assert_eq!(run["ip"], "10.10.0.2");
    // `stop --timeout 0`: no graceful attempt, SIGKILL at once.
    let out = lab.net.ok(["stop", "victim", "--timeout", "0"]);
    assert_eq!(out.trim(), "stopped victim (VMM killed)");
    assert_eq!(
        ps_entry(&lab, "victim")["exit"]["reason"],
        "stopped (killed by signal 9)"
    );
    assert!(lab.endpoint_names().is_empty());
    assert_eq!(
        lab.net.ok(["stop", "victim"]).trim(),
        "victim is not running"
    );
    lab.net.ok(["rm", "victim"]);
    let run = lab.run_vm("victim", &[]);
    assert_eq!(run["ip"], "10.10.0.2");
    lab.net.ok(["rm", "--force", "victim"]);
    assert!(lab.endpoint_names().is_empty());
    assert!(lab.records().is_empty());
}

/// `kill -9` of the supervisor: its VMM dies with it (PR_SET_PDEATHSIG) and the next micropod
/// command (here `ps`) records the end and releases the endpoint.
/// kill -9 of the supervisor `run --json` reported; waits until its VMM died with it.
fn kill_supervisor(run: &Value) {
    let supervisor = pid_of(run, "supervisor_pid");
    let vmm = pid_of(run, "pid");
    assert!(
        supervisor
            .signal(nix::libc::SIGKILL)
            .expect("kill -9 the supervisor")
    );
    wait_for(
        "the VMM dies with its supervisor",
        Duration::from_secs(2),
        || !vmm.is_alive(),
    );
}

#[test]
fn supervisor_killed_then_ps_reconciles() {
    let _serial = serial();
    let lab = VmLab::new("vm-orphan", "netfilter");
    let run = lab.run_vm("orphan", &[]);
    let tap = run["tap"].as_str().expect("tap").to_owned();
    kill_supervisor(&run);
    // Nobody has looked yet: the record still says running, the TAP is still there.
    assert_eq!(lab.records()[0].state, VmState::Running);
    assert!(lab.link_exists(&tap));

    let ps = lab.net.json(["ps", "--json"]);
    assert!(
        ps.as_array().unwrap().is_empty(),
        "not running any more: {ps}"
    );
    let entry = ps_entry(&lab, "orphan");
    assert_eq!(entry["state"], "exited");
    assert!(
        entry["exit"]["reason"]
            .as_str()
            .unwrap()
            .contains("supervisor and VMM are gone"),
        "{entry}"
    );
    assert!(lab.endpoint_names().is_empty(), "endpoint released");
    assert!(!lab.link_exists(&tap), "TAP deleted");
    lab.net.ok(["rm", "orphan"]);

    // `micropod gc` reconciles too.
    let run = lab.run_vm("orphan", &[]);
    kill_supervisor(&run);
    lab.net.ok(["gc"]);
    assert_eq!(lab.records()[0].state, VmState::Exited);
    assert!(lab.records()[0].network.released);
    assert!(lab.endpoint_names().is_empty(), "endpoint released");
    lab.net.ok(["rm", "orphan"]);
}

/// Ten `micropod run` at once: all boot with distinct addresses, the host reaches every one,
/// and each guest fetches its neighbour's page (VM i fetches VM i+1, round the ring).
#[test]
fn ten_vms_in_parallel_reach_each_other() {
    const N: u8 = 10;
    let _serial = serial();
    let lab = VmLab::new("vm-ten", "ebpf");
    // Fixed addresses, so each guest knows its neighbour's before anything boots.
    let ip = |i: u8| Ipv4Addr::new(10, 10, 0, 10 + i);
    let name = |i: u8| format!("vm{i}");
    let started = Instant::now();
    let children: Vec<_> = (0..N)
        .map(|i| {
            let fetch = format!("micropod.fetch=http://{}/", ip((i + 1) % N));
            lab.run_command(
                &name(i),
                &[
                    "--ip",
                    &ip(i).to_string(),
                    "--memory",
                    "128",
                    "--cmdline",
                    &fetch,
                ],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning micropod run")
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for (i, child) in (0..N).zip(children) {
        let out = child.wait_with_output().expect("micropod run");
        assert!(
            out.status.success(),
            "run {} failed: {}",
            name(i),
            String::from_utf8_lossy(&out.stderr)
        );
        let run: Value = serde_json::from_slice(&out.stdout).expect("run --json");
        assert_eq!(ip_of(&run), ip(i));
        assert!(
            seen.insert(run["tap"].as_str().unwrap().to_owned()),
            "distinct TAPs"
        );
    }
    let all_running = started.elapsed();
    let ps = lab.net.json(["ps", "--json"]);
    assert_eq!(ps.as_array().unwrap().len(), usize::from(N), "{ps}");

    // Each guest fetches once its own boot is done (3 tries over about 12 s when the
    // neighbour is not up yet), so how far apart they come up matters: measure it.
    let mut ready_at: Vec<Option<Duration>> = vec![None; usize::from(N)];
    wait_for("all ten ready", Duration::from_secs(240), || {
        for i in 0..N {
            let slot = &mut ready_at[usize::from(i)];
            if slot.is_none() && lab.console(&name(i)).contains(READY) {
                *slot = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        ready_at.iter().all(Option::is_some)
    });
    let ready: Vec<Duration> = ready_at.into_iter().flatten().collect();
    let (first, all_ready) = (*ready.iter().min().unwrap(), *ready.iter().max().unwrap());
    for i in 0..N {
        let page = http_get_retry(
            &lab.net.host,
            SocketAddrV4::new(ip(i), 80),
            Duration::from_secs(20),
        );
        assert!(page.contains(&ip(i).to_string()), "{page}");
    }
    for i in 0..N {
        let console =
            lab.wait_console(&name(i), "micropod-guest: fetch ", Duration::from_secs(120));
        assert!(
            console.contains("micropod-guest: fetch ok"),
            "{} could not fetch from {}:\n{console}",
            name(i),
            ip((i + 1) % N)
        );
    }
    eprintln!(
        "ten VMs: all running after {all_running:?}, first ready after {first:?}, all after {all_ready:?}"
    );
    for i in 0..N {
        lab.net.ok(["rm", "--force", &name(i)]);
    }
    assert!(lab.endpoint_names().is_empty());
}

/// Bad input: a clear error, a failure exit status, and nothing allocated (the namespace, the
/// network document and the VM records are as before).
#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let _serial = serial();
    let lab = VmLab::without_network("vm-bad");
    let kernel = lab.guest.kernel.to_str().unwrap().to_owned();
    let initrd = lab.guest.initrd.to_str().unwrap().to_owned();
    let refuse = |args: Vec<String>, needle: &str| {
        let out = lab.net.micropod(&args).output().expect("running micropod");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in:\n{stderr}"
        );
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let run = |extra: &[&str]| {
        let mut all = args(&["run", "--kernel", &kernel, "--initrd", &initrd]);
        all.extend(args(extra));
        all
    };

    lab.net.up(&["--datapath", "netfilter"]);
    // One VM, to take a name.
    lab.run_vm("taken", &[]);
    let host = lab.net.host.path();
    // The TAP pool is a cache: a run that got as far as starting its VMM used a pooled TAP,
    // which is never given back (the VMM had it open); the refill makes another.
    let snapshot = |ns| {
        snapshot(ns)
            .lines()
            .filter(|l| !l.starts_with("link \"mpp"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = (
        snapshot(host),
        lab.net.state_doc(),
        lab.records().len(),
        vm_dirs(&lab),
    );

    refuse(run(&["--name", "taken"]), "already exists");
    refuse(run(&["--name", "bad/name"]), "invalid VM name");
    refuse(run(&["--cpus", "0"]), "--cpus 0 is out of range");
    refuse(run(&["--cpus", "65"]), "--cpus 65 is out of range");
    refuse(run(&["--memory", "16"]), "--memory 16 MiB is out of range");
    refuse(run(&["--memory", "100000000"]), "out of range");
    refuse(
        run(&["--ip", "192.168.7.7"]),
        "cannot attach the network endpoint",
    );
    refuse(
        run(&["--ip", "10.10.0.2"]),
        "cannot attach the network endpoint",
    );
    refuse(run(&["--cmdline", &"x".repeat(3000)]), "shorten --cmdline");
    refuse(run(&["--rootfs", &initrd]), "cannot be used with");
    refuse(run(&["--vmm", "xen"]), "invalid value 'xen'");
    refuse(
        args(&[
            "run",
            "--kernel",
            "/nonexistent/vmlinuz",
            "--initrd",
            &initrd,
        ]),
        "no such file",
    );
    refuse(args(&["run", "--kernel", &kernel]), "--initrd");
    refuse(
        args(&[
            "run",
            "--kernel",
            &kernel,
            "--initrd",
            "/nonexistent/initrd",
        ]),
        "cannot use /nonexistent/initrd as the initrd",
    );
    refuse(
        args(&["run", "--kernel", &kernel, "--initrd", "/tmp"]),
        "not a regular file",
    );
    // A FIFO must be refused too, not opened and waited on for a writer that never comes.
    let fifo = lab.net.dirs.state.join("kernel.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (flag, other) in [("--kernel", "--initrd"), ("--initrd", "--kernel")] {
        let file = if flag == "--kernel" { &initrd } else { &kernel };
        let mut child = lab
            .net
            .micropod(["run", flag, fifo.to_str().unwrap(), other, file])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`run {flag} <fifo>` still waits after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "`run {flag} <fifo>` succeeded");
        assert!(stderr.contains("not a regular file"), "{flag}: {stderr}");
    }
    std::fs::remove_file(&fifo).unwrap();
    refuse(
        args(&[
            "run",
            "--kernel",
            &kernel,
            "--rootfs",
            "/nonexistent/disk.img",
        ]),
        "as the rootfs",
    );
    // The VMM is not installed: an empty PATH.
    let empty = lab.net.dirs.state.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let out = lab
        .net
        .micropod(run(&["--name", "nopath"]))
        .env("PATH", &empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("apt-get install qemu-system-x86"),
        "{stderr}"
    );
    std::fs::remove_dir(&empty).unwrap();
    // A kernel QEMU cannot load: the VMM exits during start, and `run` undoes everything.
    let garbage = lab.net.dirs.state.join("garbage-kernel");
    std::fs::write(&garbage, "not a kernel").unwrap();
    refuse(
        args(&[
            "run",
            "--kernel",
            garbage.to_str().unwrap(),
            "--initrd",
            &initrd,
        ]),
        "did not start: the VMM exited during start (exit code 1)",
    );
    std::fs::remove_file(&garbage).unwrap();
    // Firecracker cannot run here (no hardware KVM); whatever its driver says, nothing is made.
    refuse(
        run(&["--vmm", "firecracker", "--name", "fc"]),
        "firecracker",
    );

    for verb in ["stop", "rm", "logs", "inspect"] {
        refuse(args(&[verb, "nope"]), "no VM named \"nope\"");
    }
    refuse(args(&["rm", "taken"]), "stop it first or use `rm --force`");

    let after = (
        snapshot(host),
        lab.net.state_doc(),
        lab.records().len(),
        vm_dirs(&lab),
    );
    assert!(
        before == after,
        "bad input changed something:\nbefore {before:#?}\nafter {after:#?}"
    );

    lab.net.ok(["rm", "--force", "taken"]);
    assert!(lab.endpoint_names().is_empty());
    assert!(lab.records().is_empty());
    assert!(vm_dirs(&lab).is_empty(), "VM directories removed");
}

/// The entries of `<state>/vms` other than the lock.
fn vm_dirs(lab: &VmLab) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(lab.net.dirs.state.join(micropod::vm::VMS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock")
        .collect();
    names.sort();
    names
}

/// `kill -9` of `micropod run` after its endpoint was recorded and before its VM was: the next
/// reconcile (`ps`, `gc`, another `run`) releases the endpoint and removes the run dir, and
/// `network down` no longer finds an endpoint in its way.
#[test]
fn kill_9_of_run_before_its_record_leaves_nothing_behind() {
    let _serial = serial();
    let lab = VmLab::new("vm-kill", "netfilter");
    let kernel = lab.guest.kernel.to_str().unwrap().to_owned();
    let initrd = lab.guest.initrd.to_str().unwrap().to_owned();
    for (point, reconcile) in [("attach:recorded", "ps"), ("attach:locked", "gc")] {
        lab.net.kill_at(
            point,
            [
                "run", "--name", "killed", "--kernel", &kernel, "--initrd", &initrd,
            ],
        );
        assert!(!vm_dirs(&lab).is_empty(), "{point}: the run dir is there");
        lab.net.ok([reconcile]);
        assert!(
            lab.endpoint_names().is_empty(),
            "{point}: endpoint released by `{reconcile}`: {:?}",
            lab.endpoint_names()
        );
        assert!(lab.records().is_empty(), "{point}: no VM record");
        assert!(
            vm_dirs(&lab).is_empty(),
            "{point}: run dir removed: {:?}",
            vm_dirs(&lab)
        );
    }
    lab.net.ok(["network", "down"]);
}

/// `micropod run` on a bare host brings the network up with the defaults and says so; after
/// its bridge vanished (as after a reboot, the records kept) it brings it up again with the
/// recorded settings.
#[test]
fn run_on_a_bare_host_brings_the_network_up() {
    let _serial = serial();
    let lab = VmLab::without_network("vm-bare");
    let run = |name: &str| {
        // The note is at the info level (the lab's default is warnings only).
        let out = lab
            .run_command(name, &[])
            .env("MICROPOD_LOG", "info")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "run {name}: {stderr}");
        stderr
    };
    let said = run("first");
    assert!(
        said.contains("the network was not up: brought it up with the defaults"),
        "{said}"
    );
    assert_eq!(
        said.lines().filter(|l| l.contains("brought it up")).count(),
        1
    );
    let status = lab.net.json(["network", "status", "--json"]);
    assert_eq!(status["network"]["bridge"], "micropod0", "{status}");
    assert_eq!(lab.endpoint_names(), ["first"]);
    // Up already: nothing said.
    let said = run("second");
    assert!(!said.contains("brought it up"), "{said}");
    lab.net.ok(["stop", "first"]);
    lab.net.ok(["stop", "second"]);

    query(lab.net.host.path(), "ip", &["link", "del", "micropod0"]);
    let said = run("third");
    assert!(said.contains("brought it up again"), "{said}");
    let links = ip_json(lab.net.host.path(), &["link", "show", "micropod0"]);
    assert_eq!(links.as_array().unwrap().len(), 1);
    lab.net.ok(["stop", "third"]);
}

/// After a reboot the VMs on record are gone with everything else: `network up --restore`
/// (the boot unit's command) records their end, releases their addresses and says so.
#[test]
fn up_restore_records_the_end_of_vms_that_did_not_survive() {
    let _serial = serial();
    let lab = VmLab::new("vm-restore", "netfilter");
    let run = lab.run_vm("lost", &[]);
    // And an endpoint of no VM whose link went too.
    let side = lab
        .net
        .json(["network", "attach", "side", "--kind", "tap", "--json"]);
    query(
        lab.net.host.path(),
        "ip",
        &["link", "del", side["link"].as_str().unwrap()],
    );
    kill_supervisor(&run);
    let out = lab
        .net
        .micropod(["network", "up", "--restore"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("VM lost") && stderr.contains("supervisor and VMM are gone"),
        "{stderr}"
    );
    let once = |needle: &str| stderr.lines().filter(|l| l.contains(needle)).count() == 1;
    assert!(
        once(&format!(
            "released endpoint side ({}): its link vanished",
            side["ip"].as_str().unwrap()
        )) && once("VM lost")
            && !stderr.contains("released endpoint lost"),
        "one line per VM and per other endpoint:\n{stderr}"
    );
    assert_eq!(lab.records()[0].state, VmState::Exited);
    assert!(lab.records()[0].network.released);
    assert!(lab.endpoint_names().is_empty(), "address released");
    lab.net.ok(["rm", "lost"]);
}

/// `network detach` of a running VM's TAP would leave it running without a network and hand
/// its address to the next endpoint: refused, naming the VM and the ways out; `--force`
/// detaches and marks the VM (record, `ps`, `inspect`), whose later stop releases nothing more.
#[test]
fn detach_of_a_running_vms_endpoint_is_refused_unless_forced_and_then_marked() {
    let _serial = serial();
    let lab = VmLab::new("vm-detach", "netfilter");
    let run = lab.run_vm("owned", &[]);
    let tap = run["tap"].as_str().unwrap().to_owned();
    lab.net.wait_pool(false);

    let before = lab.net.state_doc();
    let out = lab.net.run(["network", "detach", "owned"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "detach of a running VM's endpoint succeeded"
    );
    assert!(
        stderr.contains("the network of VM owned (running)")
            && stderr.contains("micropod stop owned")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(lab.net.state_doc(), before, "nothing changed");
    assert_eq!(lab.endpoint_names(), ["owned"]);
    assert!(lab.link_exists(&tap));

    let said = lab.net.ok(["network", "detach", "--force", "owned"]);
    assert!(
        said.contains("detached owned from VM owned") && said.contains("without a network"),
        "{said}"
    );
    assert!(lab.endpoint_names().is_empty(), "the endpoint is gone");
    let rec = &lab.records()[0];
    assert_eq!(rec.state, VmState::Running, "the VM runs on");
    assert!(rec.network.released && rec.network.detached_at.is_some());
    assert!(lab.inspect("owned")["network"]["detached_at"].is_u64());
    assert!(ps_entry(&lab, "owned")["network_detached_at"].is_u64());
    let table = lab.net.ok(["ps"]);
    assert!(table.contains("network detached"), "{table}");

    // Its address is free now: another endpoint may take it, and the VM's end leaves it be.
    let att = lab
        .net
        .json(["network", "attach", "next", "--kind", "tap", "--json"]);
    assert_eq!(att["ip"], run["ip"]);
    lab.net.ok(["stop", "--timeout", "0", "owned"]);
    assert_eq!(lab.records()[0].state, VmState::Exited);
    assert_eq!(
        lab.endpoint_names(),
        ["next"],
        "the VM's end released nothing more"
    );
    lab.net.ok(["network", "detach", "next"]);
    lab.net.ok(["rm", "owned"]);
}

/// 64 containers' ADDs through the CNI plugin and VMs started at the same moment share the
/// IPAM: 66 distinct addresses; the DELs, also all at once, release exactly the containers'.
#[test]
fn parallel_cni_adds_and_vm_starts_get_distinct_addresses() {
    use micropod_tests::{NsGuard, cniexec};
    const PODS: usize = 64;
    let _serial = serial();
    let lab = VmLab::new("vm-cni", "ebpf");
    let conf = cniexec::lab_conf(&lab.net, "1.0.0", serde_json::json!({ "datapath": "ebpf" }));
    let spaces: Vec<NsGuard> = (0..PODS).map(|_| NsGuard::new("p")).collect();
    let paths: Vec<String> = spaces
        .iter()
        .map(|n| n.path().display().to_string())
        .collect();
    let vms: Vec<_> = (0..2)
        .map(|i| {
            lab.run_command(&format!("vm{i}"), &["--memory", "128"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawning micropod run")
        })
        .collect();
    let mut addresses: Vec<Ipv4Addr> = std::thread::scope(|s| {
        #[expect(
            clippy::needless_collect,
            reason = "every ADD starts before the first is joined"
        )]
        let adds: Vec<_> = (0..PODS)
            .map(|i| {
                let (conf, path, lab) = (&conf, &paths[i], &lab.net);
                s.spawn(move || {
                    let id = format!("pod{i}");
                    let r = cniexec::exec(lab, &cniexec::env("ADD", &id, path, "eth0"), conf).ok();
                    cniexec::result_ip(&r)
                })
            })
            .collect();
        adds.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for child in vms {
        let out = child.wait_with_output().expect("micropod run");
        assert!(
            out.status.success(),
            "run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run: Value = serde_json::from_slice(&out.stdout).expect("run --json");
        addresses.push(ip_of(&run));
    }
    let distinct: std::collections::BTreeSet<Ipv4Addr> = addresses.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        PODS + 2,
        "an address was handed out twice: {addresses:?}"
    );
    // Every container's sandbox has the address its result named.
    for (i, ns) in spaces.iter().enumerate() {
        let inside = ip_json(ns.path(), &["-4", "addr", "show", "dev", "eth0"]);
        assert_eq!(
            inside[0]["addr_info"][0]["local"],
            addresses[i].to_string(),
            "pod{i}"
        );
    }
    std::thread::scope(|s| {
        for i in 0..PODS {
            let (conf, lab) = (&conf, &lab.net);
            s.spawn(move || {
                let id = format!("pod{i}");
                cniexec::exec(lab, &cniexec::env("DEL", &id, "", "eth0"), conf).ok();
            });
        }
    });
    let status = lab.net.json(["network", "status", "--json"]);
    assert_eq!(
        status["network"]["ipam"]["used"], 2,
        "only the VMs' addresses are left"
    );
}
