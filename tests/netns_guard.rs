//! The namespace guard itself: isolation, loopback, removal on drop and on panic.

use std::net::{Ipv4Addr, SocketAddr};

use micropod::net::{NetNs, link};
use micropod_tests::{NsGuard, block_on};

#[test]
fn guard_creates_isolated_namespace_with_loopback_up() {
    let guard = NsGuard::new("iso");
    let path = guard.path().to_path_buf();
    assert!(path.starts_with("/run/netns"));
    // lo is up: a UDP round trip over 127.0.0.1 inside works.
    let (a, b) = guard.run(|| {
        (
            std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(),
            std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(),
        )
    });
    a.send_to(b"x", b.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 1];
    b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    b.recv_from(&mut buf)
        .expect("loopback inside the namespace works");

    // It is a different namespace from ours: only lo exists there.
    let links = block_on(async {
        let nl = guard.netlink();
        (
            link::find(&nl, "lo").await.unwrap().is_some(),
            link::find(&nl, "eth0").await.unwrap(),
        )
    });
    assert!(links.0);
    assert!(links.1.is_none(), "the test namespace sees no eth0");
    drop(guard);
    assert!(
        !path.exists(),
        "namespace mount {} left behind",
        path.display()
    );
}

#[test]
fn guard_removes_namespace_when_test_panics() {
    let mut path = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let guard = NsGuard::new("panic");
        path = Some(guard.path().to_path_buf());
        panic!("test failure inside the guard's scope");
    }));
    assert!(result.is_err());
    let path = path.unwrap();
    assert!(
        !path.exists(),
        "namespace {} survived a panic",
        path.display()
    );
}

#[test]
fn sockets_keep_their_namespace() {
    let guard = NsGuard::new("sock");
    // Bound inside: 127.0.0.1:port of the guard's namespace, not ours.
    let inside = guard.udp(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0));
    let port = inside.local_addr().unwrap().port();
    let outside = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    outside.send_to(b"x", (Ipv4Addr::LOCALHOST, port)).unwrap();
    inside
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(
        inside.recv_from(&mut buf).is_err(),
        "a datagram from the machine's namespace reached the test namespace"
    );
}

#[test]
fn existing_names_are_refused() {
    let guard = NsGuard::new("dup");
    let name = guard
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let err = NetNs::create(&name).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}
