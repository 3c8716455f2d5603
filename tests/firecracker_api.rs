//! The Firecracker driver against Firecracker's published API schema.
//!
//! Firecracker cannot run on the development machines (no hardware KVM), so a fake serves its
//! API on the VM's unix socket: it records every request, checks it against the Swagger 2.0
//! document (`../shared/firecracker-api.yaml` beside the workspace) the way Firecracker's API
//! server would (path, method, path parameters, body schema, no unknown fields), and answers
//! as Firecracker does: 204, the instance info, or 400 with a `fault_message`.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use micropod::{
    network::Mac,
    vmm::{
        Boot, VmSpec, Vmm as _, VmmError,
        firecracker::{Firecracker, api_socket},
    },
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The schema

/// Firecracker's API document, with its definitions made a draft 4 JSON Schema root.
struct ApiSchema {
    paths: serde_json::Map<String, Value>,
    /// `{"definitions": …}` with every object schema closed (see [`close_objects`]).
    root: Value,
}

/// Why a request is not one Firecracker accepts.
type Violations = Vec<String>;

impl ApiSchema {
    fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/firecracker-api.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading Firecracker's API schema {}: {e}", path.display()));
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
            .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        let doc = yaml_to_json(yaml);
        assert_eq!(
            doc["swagger"],
            "2.0",
            "{} is not Swagger 2.0",
            path.display()
        );
        let paths = doc["paths"].as_object().expect("`paths`").clone();
        let mut definitions = doc["definitions"]
            .as_object()
            .expect("`definitions`")
            .clone();
        for schema in definitions.values_mut() {
            close_objects(schema);
        }
        Self {
            paths,
            root: json!({ "definitions": definitions }),
        }
    }

    /// Checks one request as Firecracker's API server would.
    fn check(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(), Violations> {
        let (template, params) = self
            .route(path)
            .ok_or_else(|| vec![format!("no path {path} in the API")])?;
        let item = &self.paths[template];
        let operation = item
            .get(method.to_ascii_lowercase())
            .ok_or_else(|| vec![format!("{template} does not take {method}")])?;
        let declared = item["parameters"]
            .as_array()
            .into_iter()
            .chain(operation["parameters"].as_array())
            .flatten();
        let mut violations = Vec::new();
        let mut body_schema = None;
        for param in declared {
            let name = param["name"].as_str().unwrap_or_default();
            match param["in"].as_str() {
                Some("path") => {
                    // The route captured it; a body field of the same name must agree with
                    // the path (Firecracker refuses `PUT /drives/a {"drive_id": "b"}`).
                    let value = &params[name];
                    if let Some(field) = body.and_then(|b| b.get(name))
                        && field.as_str() != Some(value.as_str())
                    {
                        violations.push(format!(
                            "body {name} {field} differs from the path's {value:?}"
                        ));
                    }
                }
                Some("body") => {
                    body_schema = Some(param["schema"].clone());
                    if param["required"] == true && body.is_none() {
                        violations.push(format!("{method} {template} needs a body"));
                    }
                }
                _ => {}
            }
        }
        match (body, body_schema) {
            (Some(_), None) => violations.push(format!("{method} {template} takes no body")),
            (Some(body), Some(schema)) => violations.extend(self.validate(&schema, body)),
            (None, _) => {}
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// `instance` against `schema` (usually a `$ref` into the definitions).
    fn validate(&self, schema: &Value, instance: &Value) -> Violations {
        let mut schema = schema.clone();
        close_objects(&mut schema);
        let mut root = self.root.clone();
        for (key, value) in schema.as_object().expect("a schema object") {
            root[key] = value.clone();
        }
        let validator = jsonschema::draft4::new(&root)
            .unwrap_or_else(|e| panic!("the API schema is not valid draft 4: {e}"));
        validator
            .iter_errors(instance)
            .map(|e| format!("body{}: {e}", e.instance_path()))
            .collect()
    }

    /// The path template `path` falls under, and the path parameters it binds. Literal
    /// templates win over ones with parameters.
    fn route<'s>(&'s self, path: &str) -> Option<(&'s str, BTreeMap<String, String>)> {
        let segments: Vec<&str> = path.split('/').collect();
        let mut best: Option<(&str, BTreeMap<String, String>)> = None;
        for template in self.paths.keys() {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                continue;
            }
            let mut params = BTreeMap::new();
            let matched = parts.iter().zip(&segments).all(|(part, segment)| {
                match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) if !segment.is_empty() => {
                        params.insert(name.to_owned(), (*segment).to_owned());
                        true
                    }
                    Some(_) => false,
                    None => part == segment,
                }
            });
            if matched && best.as_ref().is_none_or(|(_, b)| b.len() > params.len()) {
                best = Some((template, params));
            }
        }
        best
    }
}

/// Makes a Swagger schema say what Firecracker enforces: its API structs are
/// `#[serde(deny_unknown_fields)]`, so an object schema that lists its properties and says
/// nothing about others gets `additionalProperties: false`. Swagger's `format`s (`int64`, and
/// one that is really a pattern) are not draft 4 formats and are dropped.
fn close_objects(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    object.remove("format");
    if object.contains_key("properties") && !object.contains_key("additionalProperties") {
        object.insert("additionalProperties".into(), false.into());
    }
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        properties.values_mut().for_each(close_objects);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = object.get_mut(key) {
            close_objects(sub);
        }
    }
}

/// YAML to JSON; keys that are not strings (response codes such as `200`) become strings.
fn yaml_to_json(value: serde_yaml_ng::Value) -> Value {
    use serde_yaml_ng::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => b.into(),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into()
            } else if let Some(u) = n.as_u64() {
                u.into()
            } else {
                n.as_f64().map_or(Value::Null, Into::into)
            }
        }
        Y::String(s) => s.into(),
        Y::Sequence(items) => items.into_iter().map(yaml_to_json).collect(),
        Y::Mapping(map) => map
            .into_iter()
            .map(|(k, v)| {
                let key = match yaml_to_json(k) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (key, yaml_to_json(v))
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Y::Tagged(tagged) => yaml_to_json(tagged.value),
    }
}

// ---------------------------------------------------------------------------------------------
// The fake Firecracker

/// One request as the fake received it.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Value>,
    verdict: Result<(), Violations>,
}

impl Recorded {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the fake answers a given `METHOD /path` instead of the normal answer.
#[derive(Clone)]
enum Answer {
    /// A Firecracker error: this status and `{"fault_message": …}`.
    Fault(u16, &'static str),
    /// A 500 whose body is not JSON.
    Garbage,
    /// Never answers (the connection stays open).
    Silence,
}

struct FakeFirecracker {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeFirecracker {
    /// Serves on `socket` after `delay` (as a starting VMM would), answering `overrides`
    /// specially and everything else as Firecracker does.
    fn serve(
        schema: Arc<ApiSchema>,
        socket: PathBuf,
        delay: Duration,
        overrides: Vec<(&'static str, Answer)>,
    ) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let (socket, requests, stop) =
                (socket.clone(), Arc::clone(&requests), Arc::clone(&stop));
            move || {
                thread::sleep(delay);
                let listener = UnixListener::bind(&socket).expect("binding the fake API socket");
                // Silent connections are kept open until the fake stops.
                let mut held = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut stream = stream.expect("accepting");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    while let Some(request) = read_request(&mut stream, &schema) {
                        let answer = overrides
                            .iter()
                            .find(|(line, _)| *line == request.line())
                            .map(|(_, a)| a.clone());
                        let verdict = request.verdict.clone();
                        requests.lock().unwrap().push(request.clone());
                        let reply = match (answer, verdict) {
                            (Some(Answer::Silence), _) => {
                                held.push(stream);
                                break;
                            }
                            (Some(Answer::Garbage), _) => reply(500, Some("oops, not JSON".into())),
                            (Some(Answer::Fault(status, fault)), _) => {
                                reply(status, Some(json!({ "fault_message": fault }).to_string()))
                            }
                            // Firecracker refuses what its schema refuses.
                            (None, Err(violations)) => reply(
                                400,
                                Some(json!({ "fault_message": violations.join("; ") }).to_string()),
                            ),
                            (None, Ok(())) if request.method == "GET" && request.path == "/" => {
                                let info = json!({
                                    "app_name": "Firecracker",
                                    "id": "vm-1",
                                    "state": "Running",
                                    "vmm_version": "1.17.0-dev",
                                });
                                let errors = schema.validate(
                                    &json!({"$ref": "#/definitions/InstanceInfo"}),
                                    &info,
                                );
                                assert!(errors.is_empty(), "the fake's InstanceInfo: {errors:?}");
                                reply(200, Some(info.to_string()))
                            }
                            (None, Ok(())) => reply(204, None),
                        };
                        if stream.write_all(&reply).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Self {
            socket,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeFirecracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop (if it is listening yet) so it sees `stop`.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let result = thread.join();
            if !thread::panicking() {
                result.expect("the fake Firecracker panicked");
            }
        }
    }
}

/// Reads one HTTP/1.1 request (head, then a `Content-Length` body); `None` at end of stream.
fn read_request(stream: &mut UnixStream, schema: &ApiSchema) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            assert!(buf.is_empty(), "the client closed mid-request: {buf:?}");
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head_len) =
            request.parse(&buf).expect("a valid request head")
        else {
            continue;
        };
        assert_eq!(request.version, Some(1), "not HTTP/1.1");
        let headers: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        let method = request.method.unwrap().to_owned();
        let path = request.path.unwrap().to_owned();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("a numeric Content-Length"));
        let mut body = buf.split_off(head_len);
        while body.len() < length {
            let n = stream.read(&mut chunk).expect("reading the body");
            assert_ne!(n, 0, "the client closed mid-body");
            body.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(
            body.len(),
            length,
            "bytes after the body (pipelining is not expected)"
        );
        let body = (length > 0).then(|| serde_json::from_slice(&body).expect("a JSON body"));
        let verdict = schema.check(&method, &path, body.as_ref());
        return Some(Recorded {
            method,
            path,
            headers,
            body,
            verdict,
        });
    }
}

/// An answer as Firecracker's micro_http writes it.
fn reply(status: u16, body: Option<String>) -> Vec<u8> {
    let mut out =
        format!("HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n");
    match body {
        Some(body) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => out.push_str("\r\n"),
    }
    out.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Tests

fn spec(run_dir: &Path, boot: Boot) -> VmSpec {
    let ip = "10.10.0.7".parse().unwrap();
    VmSpec {
        name: "vm-1".into(),
        kernel: "/var/lib/micropod/vmlinux".into(),
        boot,
        cpus: 2,
        memory_mib: 512,
        cmdline: "console=ttyS0 reboot=k panic=1 ip=10.10.0.7::10.10.0.1:255.255.255.0::eth0:off"
            .into(),
        tap: "mp-3f2a".into(),
        mac: Mac::for_ip(ip),
        ip,
        run_dir: run_dir.to_owned(),
        console_log: run_dir.join("console.log"),
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// The driver starts and stops a VM against the fake; returns what the fake received.
fn boot_and_stop(boot: Boot) -> Vec<Recorded> {
    let schema = Arc::new(ApiSchema::load());
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), boot);
    let driver = Firecracker;
    // As the lifecycle does: the command first (it clears a stale socket), then start.
    let command = driver
        .command(Path::new("/usr/bin/firecracker"), &spec)
        .unwrap();
    let socket = api_socket(dir.path());
    assert!(command.get_args().any(|a| a == socket.as_os_str()));
    // The API appears a little after the spawn; start must wait for it.
    let fake = FakeFirecracker::serve(schema, socket, Duration::from_millis(150), vec![]);
    driver
        .start(&spec, TIMEOUT)
        .expect("start against the fake");
    driver.request_stop(&spec, TIMEOUT).expect("request_stop");
    let requests = fake.requests();
    for request in &requests {
        assert_eq!(
            request.verdict,
            Ok(()),
            "{} {:?} breaks the API schema",
            request.line(),
            request.body
        );
        if request.body.is_some() {
            assert_eq!(request.header("content-type"), Some("application/json"));
        }
        assert_eq!(request.header("accept"), Some("application/json"));
    }
    requests
}

fn lines(requests: &[Recorded]) -> Vec<String> {
    requests.iter().map(Recorded::line).collect()
}

fn body<'r>(requests: &'r [Recorded], line: &str) -> &'r Value {
    let request = requests.iter().find(|r| r.line() == line).unwrap();
    request.body.as_ref().unwrap()
}

fn actions(requests: &[Recorded]) -> Vec<&Value> {
    requests
        .iter()
        .filter(|r| r.line() == "PUT /actions")
        .map(|r| &r.body.as_ref().unwrap()["action_type"])
        .collect()
}

#[test]
fn initrd_boot_sends_schema_valid_requests() {
    let requests = boot_and_stop(Boot::Initrd("/var/lib/micropod/initrd.cpio.gz".into()));
    assert_eq!(
        lines(&requests),
        [
            "PUT /boot-source",
            "PUT /network-interfaces/eth0",
            "PUT /machine-config",
            "PUT /actions",
            "GET /",
            "PUT /actions",
        ]
    );
    assert_eq!(
        body(&requests, "PUT /boot-source"),
        &json!({
            "kernel_image_path": "/var/lib/micropod/vmlinux",
            "initrd_path": "/var/lib/micropod/initrd.cpio.gz",
            "boot_args": "console=ttyS0 reboot=k panic=1 ip=10.10.0.7::10.10.0.1:255.255.255.0::eth0:off",
        })
    );
    assert_eq!(
        body(&requests, "PUT /network-interfaces/eth0"),
        &json!({ "iface_id": "eth0", "host_dev_name": "mp-3f2a", "guest_mac": "02:6d:0a:0a:00:07" })
    );
    assert_eq!(
        body(&requests, "PUT /machine-config"),
        &json!({ "vcpu_count": 2, "mem_size_mib": 512 })
    );
    assert_eq!(actions(&requests), ["InstanceStart", "SendCtrlAltDel"]);
}

#[test]
fn rootfs_boot_sends_schema_valid_requests() {
    let requests = boot_and_stop(Boot::Rootfs("/var/lib/micropod/rootfs.ext4".into()));
    assert_eq!(
        lines(&requests),
        [
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /network-interfaces/eth0",
            "PUT /machine-config",
            "PUT /actions",
            "GET /",
            "PUT /actions",
        ]
    );
    assert!(
        body(&requests, "PUT /boot-source")
            .get("initrd_path")
            .is_none()
    );
    assert_eq!(
        body(&requests, "PUT /drives/rootfs"),
        &json!({
            "drive_id": "rootfs",
            "path_on_host": "/var/lib/micropod/rootfs.ext4",
            "is_root_device": true,
            "is_read_only": false,
        })
    );
    assert_eq!(actions(&requests), ["InstanceStart", "SendCtrlAltDel"]);
}

#[test]
fn firecracker_fault_message_is_reported() {
    let schema = Arc::new(ApiSchema::load());
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), Boot::Initrd("/i.cpio".into()));
    let fault = "The memory size (MiB) is either 0, or not a multiple of the configured page size.";
    let fake = FakeFirecracker::serve(
        schema,
        api_socket(dir.path()),
        Duration::ZERO,
        vec![("PUT /machine-config", Answer::Fault(400, fault))],
    );
    let err = Firecracker.start(&spec, TIMEOUT).unwrap_err();
    match &err {
        VmmError::Api {
            request,
            status,
            fault: got,
            ..
        } => {
            assert_eq!(request, "PUT /machine-config");
            assert_eq!(*status, 400);
            assert_eq!(got, fault);
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    assert!(err.to_string().contains(fault), "{err}");
    // Nothing after the refused step: the VM is not started half-configured.
    assert_eq!(
        lines(&fake.requests()).last().unwrap(),
        "PUT /machine-config"
    );
}

#[test]
fn unreadable_error_answer_is_a_protocol_error() {
    let schema = Arc::new(ApiSchema::load());
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), Boot::Initrd("/i.cpio".into()));
    let _fake = FakeFirecracker::serve(
        schema,
        api_socket(dir.path()),
        Duration::ZERO,
        vec![("PUT /boot-source", Answer::Garbage)],
    );
    let err = Firecracker.start(&spec, TIMEOUT).unwrap_err();
    assert!(
        matches!(&err, VmmError::Protocol { request, detail, .. }
            if request == "PUT /boot-source" && detail.contains("500") && detail.contains("oops")),
        "{err:?}"
    );
}

#[test]
fn silent_api_times_out_within_the_bound() {
    let schema = Arc::new(ApiSchema::load());
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), Boot::Initrd("/i.cpio".into()));
    let _fake = FakeFirecracker::serve(
        schema,
        api_socket(dir.path()),
        Duration::ZERO,
        vec![("PUT /actions", Answer::Silence)],
    );
    let bound = Duration::from_millis(700);
    let started = Instant::now();
    let err = Firecracker.start(&spec, bound).unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&err, VmmError::Request { request, source, .. }
            if request == "PUT /actions" && source.kind() == std::io::ErrorKind::TimedOut),
        "{err:?}"
    );
    assert!(
        took >= bound && took < bound + Duration::from_secs(1),
        "took {took:?}"
    );
}

#[test]
fn missing_socket_times_out_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), Boot::Initrd("/i.cpio".into()));
    let bound = Duration::from_millis(300);
    let started = Instant::now();
    let err = Firecracker.start(&spec, bound).unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&err, VmmError::SocketTimeout { socket, timeout, .. }
            if *socket == api_socket(dir.path()) && *timeout == bound),
        "{err:?}"
    );
    assert!(
        took >= bound && took < bound + Duration::from_secs(1),
        "took {took:?}"
    );
}

/// The schema check is not vacuous: requests that break the schema in each way it checks are
/// refused, and the fake refuses them on the wire too.
#[test]
fn schema_check_rejects_broken_requests() {
    let schema = ApiSchema::load();
    let machine = json!({ "vcpu_count": 2, "mem_size_mib": 512 });
    assert_eq!(
        schema.check("PUT", "/machine-config", Some(&machine)),
        Ok(())
    );

    let broken: [(&str, &str, Option<Value>, &str); 10] = [
        (
            "PUT",
            "/machine-config",
            Some(json!({ "vcpu_count": "2", "mem_size_mib": 512 })),
            "vcpu_count",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({ "vcpu_count": 33, "mem_size_mib": 512 })),
            "vcpu_count",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({ "vcpu_count": 2 })),
            "mem_size_mib",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({ "vcpu_count": 2, "mem_size_mib": 512, "vcpus": 2 })),
            "vcpus",
        ),
        (
            "PUT",
            "/boot-source",
            Some(json!({ "boot_args": "console=ttyS0" })),
            "kernel_image_path",
        ),
        (
            "PUT",
            "/actions",
            Some(json!({ "action_type": "Reboot" })),
            "Reboot",
        ),
        (
            "PUT",
            "/drives/rootfs",
            Some(
                json!({ "drive_id": "other", "path_on_host": "/r", "is_root_device": true, "is_read_only": false }),
            ),
            "differs",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(json!({ "iface_id": "eth0", "host_dev_name": "t", "rate": 1 })),
            "rate",
        ),
        ("GET", "/actions", None, "does not take GET"),
        ("PUT", "/boot", Some(json!({})), "no path"),
    ];
    for (method, path, body, why) in broken {
        let verdict = schema.check(method, path, body.as_ref());
        let violations =
            verdict.expect_err(&format!("{method} {path} {body:?} passed the schema check"));
        assert!(
            violations.iter().any(|v| v.contains(why)),
            "{method} {path}: expected a violation about {why:?}, got {violations:?}"
        );
    }
    assert!(
        schema.check("PUT", "/actions", None).is_err(),
        "a missing required body"
    );
    assert!(
        schema.check("GET", "/", Some(&json!({}))).is_err(),
        "a body where none is taken"
    );

    // On the wire: the fake answers a broken request as Firecracker would.
    let schema = Arc::new(schema);
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFirecracker::serve(schema, api_socket(dir.path()), Duration::ZERO, vec![]);
    let mut stream = loop {
        match UnixStream::connect(api_socket(dir.path())) {
            Ok(stream) => break stream,
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    };
    let body = r#"{"vcpu_count":"2","mem_size_mib":512}"#;
    write!(
        stream,
        "PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = [0u8; 512];
    let n = stream.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("fault_message") && answer.contains("vcpu_count"),
        "{answer}"
    );
    drop(stream);
    assert!(fake.requests()[0].verdict.is_err());
}
