//! cloudlessctl's own settings: which peer to talk to and which keys to use. They live in
//! `ctl.toml` in the config directory (`--config-dir`, `$CLOUDLESS_CONFIG_DIR`,
//! `$XDG_CONFIG_HOME/cloudless` or `~/.config/cloudless`); `cloudless init` writes them for
//! the admin.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The settings file inside the config directory.
pub const FILE: &str = "ctl.toml";
/// The user key's file name in the config directory.
pub const USER_KEY: &str = "user.key";
/// The cluster root key's file name in the config directory (admins only).
pub const ROOT_KEY: &str = "root.key";

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum CtlConfigError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
}

/// cloudlessctl's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// The peer to talk to (a multiaddr ending in `/p2p/<id>`).
    pub peer: Option<String>,
    /// The user key (default: `user.key` beside this file).
    pub key: Option<PathBuf>,
    /// The cluster root key, for `token create` (default: `root.key` beside this file).
    pub root_key: Option<PathBuf>,
    /// The cluster's root public key, hex: what requests are signed for (so they cannot be
    /// replayed in another cluster). `cloudless init` writes it; otherwise the first contact
    /// asks the peer and keeps the answer here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

impl CtlConfig {
    /// Reads `ctl.toml` in `dir`; a missing file is empty settings.
    pub fn load(dir: &Path) -> Result<CtlConfig, CtlConfigError> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| CtlConfigError::Parse { path, message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CtlConfig::default()),
            Err(source) => Err(CtlConfigError::Io { path, source }),
        }
    }

    /// Writes `ctl.toml` in `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), CtlConfigError> {
        let path = dir.join(FILE);
        let io = |source| CtlConfigError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let text = toml::to_string_pretty(self)
            .map_err(|e| CtlConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        std::fs::write(&path, text).map_err(io)
    }
}

/// The default config directory.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("cloudless");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".config").join("cloudless"),
        None => PathBuf::from(".cloudless"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(CtlConfig::load(dir.path()).unwrap(), CtlConfig::default());
        let c =
            CtlConfig { peer: Some("/ip4/127.0.0.1/udp/1/quic-v1".into()), ..Default::default() };
        c.save(dir.path()).unwrap();
        assert_eq!(CtlConfig::load(dir.path()).unwrap(), c);
        std::fs::write(dir.path().join(FILE), "peer = \"x\"\npeeer = \"y\"\n").unwrap();
        let e = CtlConfig::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("peeer"), "{e}");
    }
}
