//! `cloudlessctl`: the command-line client that talks to any node over the mesh (as a mesh
//! client, `mesh::Role::Client`), with signed requests.
//!
//! See issue "The node and cloudlessctl". Nothing is implemented yet; the crate exists so the
//! workspace has its final shape.
