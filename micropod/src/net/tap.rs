//! Persistent TAP devices through the `/dev/net/tun` ioctls (placeholder, being written).
