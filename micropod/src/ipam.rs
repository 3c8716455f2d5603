//! IPv4 address management for one subnet (placeholder, being written).
