//! `cloudlessctl`: the command-line client that talks to any node over the mesh (as a mesh
//! client), with signed requests.
//!
//! So far it holds the workload document parser ([`spec`]): YAML or JSON as users write it,
//! strictly checked, into a validated `WorkloadSpec`. The verbs and the signed request
//! protocol come with the node wiring.

pub mod spec;
