//! Key files for the cluster root key and user keys: 64 hex digits and a newline, readable by
//! the owner only.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("key file {0} does not hold 64 hex digits")]
    Malformed(PathBuf),
    /// Refusing to overwrite a key.
    #[error("key file {0} exists already; refusing to overwrite it")]
    Exists(PathBuf),
}

/// Writes a new random key to `path` (never over an existing file) and returns it.
pub fn create(path: &Path) -> Result<SigningKey, KeyError> {
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    save(path, &key)?;
    Ok(key)
}

/// Writes `key` to `path`, readable by the owner only (never over an existing file).
pub fn save(path: &Path, key: &SigningKey) -> Result<(), KeyError> {
    use std::io::Write;
    let io = |source| KeyError::Io { path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(path.into())
        } else {
            io(e)
        }
    })?;
    f.write_all(format!("{}\n", hex(&key.to_bytes())).as_bytes()).map_err(io)?;
    // Durable before anyone is told it exists (a root key lost in a crash is a lost cluster).
    f.sync_all().map_err(io)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
        }
        _ => Ok(()),
    }
}

/// Reads the key in `path`.
pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| KeyError::Io { path: path.into(), source })?;
    let bytes = parse_hex(&text).ok_or_else(|| KeyError::Malformed(path.into()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// A 32-byte key from its 64 hex digits (surrounding whitespace ignored), as key files and
/// `cloudlessctl user add` write them.
pub fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

pub use cloudless_types::hex;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/admin.key");
        let k = create(&path).unwrap();
        assert_eq!(load(&path).unwrap().to_bytes(), k.to_bytes());
        assert!(matches!(create(&path), Err(KeyError::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by the owner only");
        }
        std::fs::write(&path, "zz").unwrap();
        assert!(matches!(load(&path), Err(KeyError::Malformed(_))));
        std::fs::write(&path, "g".repeat(64)).unwrap();
        assert!(matches!(load(&path), Err(KeyError::Malformed(_))));
    }
}
