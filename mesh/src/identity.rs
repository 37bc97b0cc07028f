//! The node's identity: one ed25519 keypair, persisted in the data dir, from which the PeerId
//! derives; and the one conversion between libp2p's `PeerId` and the vocabulary's
//! [`NodeName`] (the same rules, so it cannot fail).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use cloudless_types::NodeName;
use libp2p::PeerId;
use libp2p::identity::Keypair;

/// Name of the key file inside the data dir.
pub const KEY_FILE: &str = "identity.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("identity key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file does not hold an ed25519 key in libp2p's protobuf encoding.
    #[error("identity key {path} is not a valid ed25519 key: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file can be read by other users.
    #[error(
        "identity key {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its current mode.
        mode: u32,
    },
}

/// Loads the keypair from `data_dir`, creating the directory and a new key (mode 0600) when
/// there is none yet.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let io = |source| IdentityError::Io { path: path.clone(), source };
    match fs::read(&path) {
        Ok(bytes) => {
            check_permissions(&path)?;
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
                IdentityError::Invalid { path: path.clone(), reason: e.to_string() }
            })?;
            if key.clone().try_into_ed25519().is_err() {
                return Err(IdentityError::Invalid { path, reason: "not an ed25519 key".into() });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_private_dir(data_dir).map_err(io)?;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| IdentityError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            write_private(&path, &bytes).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn check_permissions(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|source| IdentityError::Io { path: path.to_path_buf(), source })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_: &Path) -> Result<(), IdentityError> {
    Ok(())
}

/// Creates `dir` (and its parents) if missing, readable by the owner only (0700): it holds the
/// node's key, its raft log and its workloads' files.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Writes `bytes` to a new file readable by the owner only, atomically (temp file, synced,
/// renamed, and the directory synced: a crash leaves no key or the whole key).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// The node name of `peer`. `NodeName` accepts exactly the multihashes libp2p accepts as
/// peer ids (checked by the tests below), so this cannot fail.
#[allow(clippy::expect_used)]
pub fn node_name(peer: &PeerId) -> NodeName {
    NodeName::from_bytes(&peer.to_bytes()).expect("every peer id is a valid node name")
}

/// The peer id `name` spells. Every `NodeName` is a peer id (checked by the tests below), so
/// this cannot fail.
#[allow(clippy::expect_used)]
pub fn peer_id(name: &NodeName) -> PeerId {
    PeerId::from_bytes(&name.to_bytes()).expect("every node name is a valid peer id")
}

/// The membership [`Seal`](crate::membership::Seal) of a node: its updates are signed with its
/// libp2p ed25519 key, and an author's public key is read from its PeerId (an ed25519 PeerId
/// is the identity multihash of the key), so no key travels with an update.
pub struct KeySeal(Keypair);

impl KeySeal {
    /// A seal that signs with `keypair`.
    pub fn new(keypair: Keypair) -> Self {
        KeySeal(keypair)
    }
}

impl crate::membership::Seal<PeerId> for KeySeal {
    fn sign(&self, claim: &[u8]) -> crate::membership::Signature {
        // Ed25519 signing cannot fail; a zero signature, should it ever, verifies nowhere.
        self.0
            .sign(claim)
            .ok()
            .and_then(|s| crate::membership::Signature::from_slice(&s))
            .unwrap_or_else(|| crate::membership::Signature::new([0; 64]))
    }

    fn verify(
        &self,
        author: &PeerId,
        claim: &[u8],
        signature: &crate::membership::Signature,
    ) -> bool {
        verify(author, claim, signature)
    }
}

fn verify(author: &PeerId, claim: &[u8], signature: &crate::membership::Signature) -> bool {
    public_key(author).is_some_and(|k| k.verify(claim, signature.as_bytes()))
}

/// Whether a membership update carries its author's signature.
pub fn verify_update(update: &crate::membership::Update<PeerId>) -> bool {
    verify(update.author(), &update.claim(), &update.signature)
}

/// The public key inside an identity-multihash PeerId (every ed25519 PeerId); `None` for a
/// hashed one (RSA and other long keys), which no Cloudless node has.
pub fn public_key(peer: &PeerId) -> Option<libp2p::identity::PublicKey> {
    let bytes = peer.to_bytes();
    match bytes.as_slice() {
        [0x00, len, key @ ..] if usize::from(*len) == key.len() => {
            libp2p::identity::PublicKey::try_decode_protobuf(key).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn refuses_garbage_and_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        write_private(&path, b"not a key").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is not a valid ed25519 key"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = Keypair::generate_ed25519().to_protobuf_encoding().unwrap();
            fs::write(&path, key).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            let err = load_or_create(dir.path()).unwrap_err();
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn peer_ids_and_node_names_convert_both_ways() {
        for _ in 0..64 {
            let peer = PeerId::random();
            let name = node_name(&peer);
            assert_eq!(name.as_str(), peer.to_string());
            assert_eq!(peer_id(&name), peer);
        }
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        assert_eq!(node_name(&peer), NodeName::new(peer.to_string()).unwrap());
        let ed = key.try_into_ed25519().unwrap().public().to_bytes();
        assert_eq!(NodeName::from_ed25519(ed), node_name(&peer), "derived as libp2p derives");
    }

    proptest::proptest! {
        /// Every multihash a NodeName accepts, libp2p accepts as a peer id.
        #[test]
        fn every_node_name_is_a_peer_id(
            identity in proptest::bool::ANY,
            digest in proptest::collection::vec(0u8.., 0..=64),
        ) {
            let (code, max) = if identity { (0x00u8, 42) } else { (0x12u8, 64) };
            let mut bytes = vec![code, digest.len() as u8];
            bytes.extend_from_slice(&digest);
            match NodeName::from_bytes(&bytes) {
                Ok(name) => {
                    proptest::prop_assert!(digest.len() <= max);
                    proptest::prop_assert_eq!(peer_id(&name).to_bytes(), bytes);
                }
                Err(_) => proptest::prop_assert!(digest.len() > max),
            }
        }
    }

    #[test]
    fn a_key_seal_verifies_its_own_signatures_only() {
        use crate::membership::Seal;
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (pa, pb) = (a.public().to_peer_id(), b.public().to_peer_id());
        assert_eq!(public_key(&pa), Some(a.public()));
        let seal = KeySeal::new(a);
        let sig = seal.sign(b"claim");
        assert!(seal.verify(&pa, b"claim", &sig));
        assert!(!seal.verify(&pb, b"claim", &sig), "another author");
        assert!(!seal.verify(&pa, b"other", &sig), "another claim");
        let mut bent = *sig.as_bytes();
        bent[5] ^= 1;
        let bent = crate::membership::Signature::from_slice(&bent).unwrap();
        assert!(!seal.verify(&pa, b"claim", &bent), "a changed signature");
    }

    /// The sizes `docs/mesh.md` counts a flood in: a signed alive notice, a suspicion and a
    /// capacity summary about an ed25519 PeerId.
    #[test]
    fn signed_updates_are_the_size_the_bandwidth_bound_counts() {
        use crate::membership::{Update, UpdateKind, encoded_len};
        let key = Keypair::generate_ed25519();
        let (me, seal) = (key.public().to_peer_id(), KeySeal::new(key));
        let size = |kind| encoded_len(&Update::signed(me, 3, kind, &seal));
        let alive = size(UpdateKind::Alive);
        let suspect = size(UpdateKind::Suspect { by: me, witnesses: 5 });
        let capacity =
            size(UpdateKind::Capacity { version: 7, capacity: cloudless_types::Capacity::EMPTY });
        assert!((100..=115).contains(&alive), "alive {alive}");
        assert!((140..=150).contains(&suspect), "suspect {suspect}");
        assert!((105..=140).contains(&capacity), "capacity {capacity}");
    }
}
