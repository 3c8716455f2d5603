//! nf_tables over netlink: micropod's MASQUERADE fallback (placeholder, being written).
