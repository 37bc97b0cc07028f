//! Files that must survive a crash and stay private: written aside, synced, renamed over the
//! old one, and the directory synced, so a crash leaves the old file or the new one, never a
//! torn one; readable by the node's user only.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` durably (see the module), mode 0600.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Syncs the directory holding `path`, so that a file created or renamed there survives a
/// crash.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

/// The file in the data dir that says where it last ran.
pub const PLACE_FILE: &str = "place";

/// Where a data dir runs: the machine and the path. A data dir copied to another place and
/// started there is a second node with the first one's identity, which no peer can tell apart
/// from it; so a node notices when it is not where it last ran.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Place {
    /// The machine's id (`/etc/machine-id`, else its host name).
    pub machine: String,
    /// The data dir's absolute path.
    pub path: std::path::PathBuf,
}

/// How a data dir relates to where it last ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Whereabouts {
    /// It runs where it ran.
    Same,
    /// It has no record yet (a new node, or one from before the record existed).
    Unrecorded,
    /// It last ran elsewhere (copied, or moved).
    Elsewhere(Place),
}

impl Place {
    /// Where `data_dir` is now.
    pub fn here(data_dir: &Path) -> Place {
        let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        Place { machine: machine_id(), path }
    }

    /// Compares this place with the record in `data_dir`.
    pub fn compare(&self, data_dir: &Path) -> Whereabouts {
        let text = std::fs::read_to_string(data_dir.join(PLACE_FILE)).ok();
        match text.and_then(|t| toml::from_str::<Place>(&t).ok()) {
            None => Whereabouts::Unrecorded,
            Some(p) if p == *self => Whereabouts::Same,
            Some(p) => Whereabouts::Elsewhere(p),
        }
    }

    /// Records this place in `data_dir`.
    pub fn record(&self, data_dir: &Path) -> std::io::Result<()> {
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        write_synced(&data_dir.join(PLACE_FILE), text.as_bytes())
    }
}

/// This machine's id: the systemd/dbus machine id, else the host name, else "unknown".
fn machine_id() -> String {
    ["/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().chars().take(256).collect::<String>())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Makes `dir` readable by its owner only (it holds the node's key and raft log).
pub fn make_private(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_data_dir_knows_when_it_was_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        let here = Place::here(&a);
        assert_eq!(here.compare(&a), Whereabouts::Unrecorded);
        here.record(&a).unwrap();
        assert_eq!(here.compare(&a), Whereabouts::Same);
        // Copied next door: the record names where it came from.
        std::fs::create_dir_all(&b).unwrap();
        std::fs::copy(a.join(PLACE_FILE), b.join(PLACE_FILE)).unwrap();
        assert_eq!(Place::here(&b).compare(&b), Whereabouts::Elsewhere(here.clone()));
        // On another machine at the same path.
        let other = Place { machine: "another".into(), ..here.clone() };
        assert_eq!(other.compare(&a), Whereabouts::Elsewhere(here));
        // A damaged record is no record.
        std::fs::write(a.join(PLACE_FILE), "not toml = = =").unwrap();
        assert_eq!(Place::here(&a).compare(&a), Whereabouts::Unrecorded);
    }

    #[test]
    fn data_dirs_are_made_private() {
        let dir = tempfile::tempdir().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            make_private(dir.path()).unwrap();
            let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn a_synced_file_replaces_the_old_one_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group");
        write_synced(&path, b"one").unwrap();
        write_synced(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("group.tmp").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
