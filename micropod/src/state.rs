//! The state dir: one lock, atomic JSON documents (placeholder, being written).
