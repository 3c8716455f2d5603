//! The demo behind `./dev demo`: two MicroVMs on micropod's network, in a lab of namespaces it
//! makes (a "host" namespace with the bridge and an uplink, an "internet" namespace with a web
//! server at 198.51.100.10):
//! 1. `micropod network up` (the eBPF data path when it loads, else netfilter);
//! 2. `micropod run` twice: the test guest (`cargo xtask guest`), each fetching a page from the
//!    internet server at boot;
//! 3. `curl` from the host to each VM's web server, each VM's fetch through the NAT (the server
//!    sees the uplink's address), `micropod stats` with the per-VM counters;
//! 4. a container on the same network, through micropod's CNI plugin: containerd's
//!    `ctr run --cni` (in the host namespace), its address from the same IPAM, `curl` to it,
//!    and from it to a VM; stopping it releases it;
//! 5. `micropod metrics serve`, scraped once with curl;
//! 6. `micropod stop`, `network down`.
//!
//! Everything it makes is removed when it ends, on error too (the lab's guards kill the VMs it
//! started and remove the namespaces and pin dir).

use std::{
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use micropod_tests::{
    micropod_bin,
    netlab::{SERVER_ADDR, UPLINK_ADDR},
    runtimes::{Containerd, IMAGE, oci_image},
    vmlab::{HttpServer, VmLab},
};
use serde_json::{Value, json};

const VMS: [&str; 2] = ["web1", "web2"];
const READY: &str = "micropod-guest: ready";
const FETCHED: &str = "micropod-guest: fetch ";
/// Booting under TCG takes 5–10 s here, two at once a little more.
const BOOT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(text: &str) {
    println!("\n== {text}");
}

/// Runs `micropod ARGS` in the lab's host namespace, echoing the command and its output.
fn show<I, S>(lab: &VmLab, args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    println!(
        "$ micropod {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = lab.net.run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    ensure!(
        out.status.success(),
        "micropod failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn json(lab: &VmLab, args: &[&str]) -> anyhow::Result<Value> {
    let out = lab.net.run(args);
    ensure!(
        out.status.success(),
        "micropod {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("micropod's JSON")
}

fn demo() -> anyhow::Result<()> {
    let lab = VmLab::without_network("demo");
    let server = HttpServer::start(
        &lab.net.internet,
        SocketAddrV4::new(SERVER_ADDR, 80),
        "hello from the internet\n",
    );
    say("the lab: namespaces made for this demo (the machine's own network is not touched)");
    println!("  host      bridge micropod0 (made below), uplink uplink0 {UPLINK_ADDR}/24");
    println!(
        "  internet  a web server at {SERVER_ADDR}, no route back to the VMs' subnet: only NAT gets answers"
    );

    say("the network");
    show(&lab, ["network", "up"])?;

    say("two MicroVMs (QEMU microvm; each fetches a page from the internet server as it boots)");
    let fetch = format!("micropod.fetch=http://{SERVER_ADDR}/");
    let mut addrs = Vec::new();
    for name in VMS {
        let mut args: Vec<&OsStr> = ["run", "--kernel"].map(OsStr::new).to_vec();
        args.push(lab.guest.kernel.as_os_str());
        args.push(OsStr::new("--initrd"));
        args.push(lab.guest.initrd.as_os_str());
        args.extend(["--name", name, "--cmdline", &fetch].map(OsStr::new));
        show(&lab, &args)?;
        let vm = json(&lab, &["inspect", name])?;
        let ip: Ipv4Addr = vm["network"]["ip"]
            .as_str()
            .context("the VM's address")?
            .parse()?;
        addrs.push(ip);
    }
    show(&lab, ["ps"])?;

    say("waiting for both guests to boot (`micropod logs -f NAME` shows the console)");
    let started = Instant::now();
    for name in VMS {
        wait_console(&lab, name, READY)?;
        println!(
            "  {name}: ready after {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    say("curl from the host to each VM's web server, over the bridge");
    for ip in &addrs {
        let url = format!("http://{ip}/");
        println!("$ curl {url}");
        let page = curl_in_host(&lab, &url)?;
        print!("{page}");
    }

    say("each VM reached the internet server through the NAT");
    for name in VMS {
        let console = wait_console(&lab, name, FETCHED)?;
        let line = console
            .lines()
            .find(|l| l.contains(FETCHED))
            .unwrap_or_default();
        println!("  {name} console: {}", line.trim());
        ensure!(
            line.contains("fetch ok"),
            "{name} could not fetch from the internet"
        );
    }
    let peers = server.peers();
    println!(
        "  the server saw {} request(s), from {:?}",
        peers.len(),
        peers
            .iter()
            .map(|p| p.ip())
            .collect::<std::collections::BTreeSet<_>>()
    );
    ensure!(
        peers
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(UPLINK_ADDR)),
        "requests should come from the uplink address"
    );

    say("per-VM counters and the NAT table, read from the pinned BPF maps");
    show(&lab, ["stats"])?;
    show(&lab, ["network", "status"])?;

    container(&lab, addrs[0])?;

    say("the Prometheus exporter: `micropod metrics serve`, scraped with curl");
    scrape_exporter(&lab)?;

    say("stop the VMs (ACPI power button; the TAP and the address are released)");
    for name in VMS {
        show(&lab, ["stop", name])?;
    }
    show(&lab, ["network", "down"])?;
    say("done: everything the demo made is removed as it exits");
    Ok(())
}

/// A busybox container of containerd's on the VMs' network: `ctr run --cni` runs micropod's
/// plugin (installed under a name of the demo's own, removed at the end) in the host namespace.
fn container(lab: &VmLab, vm: Ipv4Addr) -> anyhow::Result<()> {
    say(
        "a container on the same network: containerd's `ctr run --cni` with micropod as its CNI plugin",
    );
    let mut ctd = Containerd::start(lab.net.host.path());
    let plugin = ctd.cni().install_plugin("micropod", &micropod_bin());
    let network = ctd.cni().network_name("demo");
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{
            "type": plugin,
            "bridge": "micropod0",
            "subnet": "10.10.0.0/24",
            "stateDir": lab.net.dirs.state,
            "bpfDir": lab.net.dirs.pins.join("micropod"),
        }],
    });
    let path = ctd.cni().write_conflist(&conflist);
    println!("$ cat {}", path.display());
    println!("{}", serde_json::to_string_pretty(&conflist)?);
    let image = oci_image(ctd.dir());
    ctd.import(&image);
    println!("$ ctr run --cni {IMAGE} web httpd -f -p 80 -h /www");
    ctd.run_cni("web", &["httpd", "-f", "-p", "80", "-h", "/www"]);
    show(lab, ["network", "ls"])?;
    let ep = json(lab, &["network", "ls", "--json"])?
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["cni"].is_object()).cloned())
        .context("the container's endpoint")?;
    let ip = ep["ip"].as_str().context("its address")?;
    let url = format!("http://{ip}/");
    println!("$ curl {url}");
    print!("{}", curl_in_host(lab, &url)?);
    println!("$ ctr task exec web wget -q -O - http://{vm}/");
    let out = ctd.exec("web", &["wget", "-q", "-O", "-", &format!("http://{vm}/")]);
    ensure!(
        out.status.success(),
        "the container cannot reach the VM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    show(lab, ["stats"])?;
    println!(
        "$ ctr task kill web   (ctr sends the plugin DEL: the address and the port are released)"
    );
    ctd.stop("web");
    show(lab, ["network", "ls"])?;
    Ok(())
}

fn wait_console(lab: &VmLab, name: &str, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + BOOT;
    loop {
        let out = lab.net.run(["logs", name]);
        let console = String::from_utf8_lossy(&out.stdout).into_owned();
        if console.contains(needle) {
            return Ok(console);
        }
        if Instant::now() > deadline {
            bail!("{needle:?} not on {name}'s console within {BOOT:?}:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Starts the exporter in the lab's host namespace, scrapes it once with curl and shows the
/// per-VM series; the exporter is ended by its PID on every path.
fn scrape_exporter(lab: &VmLab) -> anyhow::Result<()> {
    struct Exporter(std::process::Child);
    impl Drop for Exporter {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let listen = "127.0.0.1:9464";
    println!("$ micropod metrics serve --listen {listen} &");
    let _exporter = Exporter(
        lab.net
            .micropod(["metrics", "serve", "--listen", listen])
            .spawn()
            .context("starting the exporter")?,
    );
    let url = format!("http://{listen}/metrics");
    println!("$ curl -s {url} | grep -E 'vm=|^micropod_(up|datapath|nat_entries|ipam)'");
    let text = curl_in_host(lab, &url)?;
    ensure!(text.ends_with("# EOF\n"), "a whole exposition");
    let mut shown = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let wanted = line.contains("vm=\"") && !line.contains("drops_total")
            || [
                "micropod_up ",
                "micropod_datapath{",
                "micropod_nat_entries ",
                "micropod_ipam_",
            ]
            .iter()
            .any(|p| line.starts_with(p));
        if wanted {
            println!("{line}");
            shown += 1;
        }
    }
    ensure!(
        text.lines()
            .any(|l| l.starts_with("micropod_endpoint_info{") && l.contains("vm=\"")),
        "the VMs' series carry their names"
    );
    println!(
        "  ({shown} of {} series shown)",
        text.lines().filter(|l| !l.starts_with('#')).count()
    );
    Ok(())
}

/// `curl` run inside the host namespace (retrying while the guest's httpd starts).
fn curl_in_host(lab: &VmLab, url: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", lab.net.host.path().display()))
            .args(["curl", "-sS", "--max-time", "5", url])
            .output()
            .context("running curl")?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        if Instant::now() > deadline {
            bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
