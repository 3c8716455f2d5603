//! Real container runtimes on micropod's network through its CNI plugin: containerd
//! (`ctr run --cni`) and podman (CNI backend) each run a busybox container on the same network
//! as a `micropod run` VM, in a test "host" namespace (see `runtimes` for the harness and what
//! each runtime does as a CNI client). The container gets its address from the shared IPAM,
//! the host reaches its web server, it reaches the VM and the "internet" (through the eBPF
//! SNAT: the server sees the uplink address, conntrack never sees the flow), its counters move
//! in `stats` and the exporter, and the runtime's DEL on stop releases everything.
//!
//! A logging wrapper around the plugin records what each runtime passed and what it answered.
//! The harnesses take turns on one machine-wide lock, so the runtimes run one after the other.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use micropod_tests::{
    micropod_bin,
    netlab::{NetLab, SERVER_ADDR, UPLINK_ADDR},
    runtimes::{CniCall, CniDirs, Containerd, IMAGE_INDEX, Podman, cni_calls, ipv4_of, oci_image},
    vmlab::{HttpServer, VmLab, http_get_retry},
};
use serde_json::{Value, json};

const HTTPD: &[&str] = &["httpd", "-f", "-p", "80", "-h", "/www"];
const INTERNET_PORT: u16 = 8080;

/// micropod's plugin (the binary itself, behind a logging wrapper) and a conflist for the lab's
/// network, on the eBPF data path, its calls logged in `log`; returns the network name.
fn micropod_network(cni: &mut CniDirs, lab: &NetLab, log: &Path) -> String {
    let plugin = cni.install_logging_wrapper("micropod", &micropod_bin(), log);
    let name = cni.network_name("mp");
    // libcni 1.1 (in both runtimes) takes results up to 1.0.0.
    cni.write_conflist(&json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": plugin,
            "bridge": "micropod0",
            "subnet": "10.10.0.0/24",
            "datapath": "ebpf",
            "stateDir": lab.dirs.state,
            "bpfDir": lab.dirs.pins.join("micropod"),
        }],
    }));
    name
}

fn calls(log: &Path, command: &str) -> Vec<CniCall> {
    cni_calls(log)
        .into_iter()
        .filter(|c| c.command == command)
        .collect()
}

#[track_caller]
fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The endpoint of container `id` in `network ls --json`, if there is one.
fn endpoint_of(lab: &NetLab, id: &str) -> Option<Value> {
    lab.json(["network", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["cni"]["container_id"] == id)
        .cloned()
}

/// What every container must find on the network, whichever runtime made it: `exec` runs a
/// command in the container and returns its stdout.
fn check_container(
    lab: &VmLab,
    id: &str,
    ip: Ipv4Addr,
    vm_ip: Ipv4Addr,
    server: &HttpServer,
    exec: &dyn Fn(&[&str]) -> String,
) {
    let net = &lab.net;
    assert!(
        ip.octets()[..3] == [10, 10, 0] && ip != vm_ip,
        "{id}: {ip} is not an address of its own in the shared subnet"
    );
    let ep = endpoint_of(net, id).unwrap_or_else(|| panic!("no endpoint of {id}"));
    assert_eq!(ep["ip"], ip.to_string());
    // The host reaches the container's web server over the bridge.
    let body = http_get_retry(
        &net.host,
        SocketAddrV4::new(ip, 80),
        Duration::from_secs(10),
    );
    assert_eq!(body, IMAGE_INDEX);
    // The container reaches the VM's.
    let page = exec(&["wget", "-q", "-O", "-", &format!("http://{vm_ip}/")]);
    assert_eq!(
        page.trim(),
        format!("micropod-guest micropod-guest {vm_ip}"),
        "{id} -> VM"
    );
    // And the internet, through the eBPF SNAT: the uplink's address, no conntrack entry.
    let before = server.peers().len();
    let page = exec(&[
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{SERVER_ADDR}:{INTERNET_PORT}/"),
    ]);
    assert_eq!(page, "internet", "{id} -> internet");
    let peers = server.peers();
    assert_eq!(peers.len(), before + 1);
    assert_eq!(
        peers[before].ip(),
        UPLINK_ADDR,
        "not translated to the uplink's address"
    );
    assert_eq!(
        net.conntrack_flows_to_server(),
        0,
        "the fast path's flow is in conntrack"
    );
    // Its counters, in `stats` and in the exporter with its container id.
    let stats = net.json(["stats", "--json"]);
    let mine = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["cni"]["container_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in stats: {stats}"))
        .clone();
    assert!(mine["tx_packets"].as_u64().unwrap() >= 10, "{mine}");
    assert!(mine["rx_bytes"].as_u64().unwrap() >= 100, "{mine}");
    let scrape = net.ok(["metrics", "print"]);
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("micropod_endpoint_receive_bytes_total{")
                && l.contains(&format!("container_id=\"{id}\""))),
        "{id} has no series in the exporter"
    );
}

/// After the runtime's DEL: no endpoint of the container, its address free, its port gone.
fn check_released(lab: &NetLab, id: &str, ip: Ipv4Addr) {
    assert!(endpoint_of(lab, id).is_none(), "{id} is still on record");
    let status = lab.json(["network", "status", "--json"]);
    assert_eq!(
        status["network"]["ipam"]["used"], 1,
        "only the VM's address is held"
    );
    let stats = lab.json(["stats", "--json"]);
    assert!(
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["ip"] != ip.to_string()),
        "{stats}"
    );
}

#[test]
fn containerd_and_podman_containers_share_the_network_with_a_vm() {
    let started = Instant::now();
    let lab = VmLab::new("rt", "ebpf");
    let server = HttpServer::start(
        &lab.net.internet,
        SocketAddrV4::new(SERVER_ADDR, INTERNET_PORT),
        "internet",
    );
    let vm = lab.run_vm("vm", &["--memory", "128"]);
    let vm_ip: Ipv4Addr = vm["ip"].as_str().unwrap().parse().unwrap();
    http_get_retry(
        &lab.net.host,
        SocketAddrV4::new(vm_ip, 80),
        Duration::from_secs(120),
    );
    eprintln!("VM up after {:?}", started.elapsed());

    // containerd: ctr runs the plugin itself, in the lab's host namespace.
    {
        let mut ctd = Containerd::start(lab.net.host.path());
        let log = ctd.dir().join("cni-calls");
        micropod_network(ctd.cni(), &lab.net, &log);
        let image = oci_image(ctd.dir());
        ctd.import(&image);
        ctd.run_cni("web", HTTPD);
        let id = format!("{}-web", ctd.namespace());
        let ip = ipv4_of(&ctd.netns("web"), "eth0");
        let exec = |cmd: &[&str]| {
            let out = ctd.exec("web", cmd);
            assert!(out.status.success(), "ctr task exec {cmd:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        check_container(&lab, &id, ip, vm_ip, &server, &exec);
        let add = calls(&log, "ADD");
        assert_eq!(add.len(), 1, "{add:?}");
        assert_eq!(add[0].rc, Some(0));
        assert_eq!(add[0].var("CNI_CONTAINERID"), id);

        // Stopping: the foreground ctr's DEL, with an empty netns, releases everything.
        let exited = ctd.stop("web");
        assert!(
            !exited.stderr.contains("network review"),
            "DEL failed: {exited:?}"
        );
        let del = calls(&log, "DEL");
        assert_eq!(del.len(), 1, "{del:?}");
        assert_eq!(del[0].var("CNI_NETNS"), "");
        assert_eq!(del[0].rc, Some(0), "{:?}", del[0]);
        check_released(&lab.net, &id, ip);
    }

    // podman: it runs the plugin in its own process, also in the lab's host namespace; it
    // asks every plugin for VERSION first.
    {
        let mut podman = Podman::new(lab.net.host.path());
        let log = podman.dir().join("cni-calls");
        let network = micropod_network(podman.cni(), &lab.net, &log);
        let image = oci_image(podman.dir());
        podman.load(&image);
        let id = podman.run("web2", &network, HTTPD);
        let ip = podman.ipv4("web2", &network);
        assert_eq!(ipv4_of(&podman.netns("web2"), "eth0"), ip);
        let exec = |cmd: &[&str]| {
            let out = podman.exec("web2", cmd);
            assert!(out.status.success(), "podman exec {cmd:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        check_container(&lab, &id, ip, vm_ip, &server, &exec);
        assert!(
            calls(&log, "VERSION").iter().all(|c| c.rc == Some(0)),
            "VERSION failed"
        );
        // podman names the pod after the container.
        let ep = endpoint_of(&lab.net, &id).unwrap();
        assert_eq!(ep["cni"]["pod_name"], "web2");

        let out = podman.stop("web2");
        assert!(out.status.success(), "podman stop: {out:?}");
        let del = calls(&log, "DEL");
        assert_eq!(del.len(), 1, "{del:?}");
        assert_eq!(del[0].rc, Some(0), "{:?}", del[0]);
        check_released(&lab.net, &id, ip);
        let out = podman.rm("web2");
        assert!(out.status.success(), "podman rm: {out:?}");

        // A container that ends by itself: conmon's cleanup sends DEL with an environment
        // podman reduced; the plugin takes everything from the conflist.
        let id = podman.run("short", &network, &["sleep", "1"]);
        wait_for(
            "the DEL of the container that ended",
            Duration::from_secs(20),
            || {
                calls(&log, "DEL")
                    .iter()
                    .any(|c| c.var("CNI_CONTAINERID") == id && c.rc.is_some())
            },
        );
        let del = calls(&log, "DEL");
        assert_eq!(del.last().unwrap().rc, Some(0), "{:?}", del.last());
        assert!(
            endpoint_of(&lab.net, &id).is_none(),
            "short is still on record"
        );
    }
    lab.net.ok(["rm", "--force", "vm"]);
    eprintln!("runtimes test: {:?}", started.elapsed());
}
