//! The Cloudless mesh: one libp2p node per device.
pub mod codec;
pub mod config;
pub mod directory;
pub mod gate;
pub mod identity;
pub mod membership;
pub mod node;
pub mod rpc;

pub use config::{Config, RelayMode, Role};
pub use gate::{Gate, OpenGate, Protocol};
pub use node::{Event, Handle, Mesh, MeshError, Reachability, start, start_with_identity};
