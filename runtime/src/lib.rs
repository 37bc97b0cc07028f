//! The Cloudless runtime: WASI modules through wasmtime and containers through the Docker
//! Engine API, and the per-node reconciler that drives them.
//!
//! See issue "The runtime". Nothing is implemented yet; the crate exists so the workspace has
//! its final shape.
