//! Invites: one copy-pasteable string that lets a device join a cluster. It carries the
//! cluster's name, addresses to reach it, and an enrollment [`Token`] signed by the cluster
//! root key; the leader checks the signature, the expiry and the nonce's uses when it applies
//! the `Enroll` command.
//!
//! ```text
//!   admin: Token { cluster, nonce, expiry, max uses, roles, labels, claim key }
//!          ──sign(root key)──▶ "cloudless-invite-2." + base64url(postcard(Invite + claim
//!          secret)) ──(chat, mail, QR)──▶ new device: decode (size, prefix, shape,
//!          signature, claim) ──▶ dial bootstrap ──▶ Enroll { token, proof: claim secret's
//!          signature over (token, own PeerId) } through the mesh
//! ```
//!
//! The claim secret makes the invite, not the token, the credential: the nodes an
//! enrollment passes through see the token and the proof for one PeerId, and neither lets
//! them enroll another identity.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use serde::{Deserialize, Serialize};

use crate::command::{NodeRole, Token, UserKey};

/// Prefix of every invite; the number is the format version.
pub const PREFIX: &str = "cloudless-invite-2.";
/// Prefix of the earlier format (tokens without a claim key), refused with a clear message.
const OLD_PREFIX: &str = "cloudless-invite-1.";
/// Longest invite accepted, in characters: room for a dozen addresses and labels, small
/// enough to paste anywhere.
pub const MAX_INVITE: usize = 8 * 1024;
/// Most bootstrap addresses in one invite.
pub const MAX_BOOTSTRAP: usize = 16;

/// An invite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The cluster root public key that signed the token (a joining device checks the
    /// signature against it; the leader checks it against the recorded root key).
    pub root_key: UserKey,
    /// Multiaddresses of members to join through (with `/p2p/<id>`).
    pub bootstrap: Vec<String>,
    /// The enrollment token.
    pub token: Token,
    /// The root key's signature over `token.to_bytes()` (what the leader checks).
    pub signature: Vec<u8>,
    /// The root key's signature over everything above (what the joining device checks, so
    /// the bootstrap addresses cannot be swapped for an impostor's either).
    pub seal: Vec<u8>,
    /// The private half of `token.claim_key` (an ed25519 seed): what proves that an
    /// enrolling device holds this invite.
    pub claim: [u8; 32],
}

/// The bytes the seal signs.
fn sealed_bytes(
    root_key: &UserKey,
    bootstrap: &[String],
    token: &Token,
    signature: &[u8],
) -> Vec<u8> {
    postcard::to_allocvec(&(root_key, bootstrap, token, signature)).unwrap_or_default()
}

/// Why an invite string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    /// Not an invite at all.
    #[error("not a Cloudless invite (it should start with {PREFIX})")]
    NotAnInvite,
    /// Longer than [`MAX_INVITE`].
    #[error("the invite is {0} characters long; at most {MAX_INVITE} are accepted")]
    TooLong(usize),
    /// Damaged in transit (cut, or changed).
    #[error("the invite is damaged: {0}")]
    Damaged(String),
    /// The signature does not match the token and key it carries.
    #[error("the invite's signature does not match its token; it was changed or forged")]
    BadSignature,
    /// Past its expiry.
    #[error("the invite expired {0} s ago; ask for a new one")]
    Expired(u64),
    /// Made by an earlier version, whose tokens any relaying node could use.
    #[error("the invite is of an earlier format (cloudless-invite-1); ask for a new one")]
    OldFormat,
}

/// What to grant in a new invite.
#[derive(Clone, Debug)]
pub struct Grant {
    /// Roles the node gets.
    pub roles: BTreeSet<NodeRole>,
    /// Labels the node gets.
    pub labels: BTreeMap<String, String>,
    /// How many nodes may use it.
    pub max_uses: u32,
    /// Valid until (milliseconds since the epoch).
    pub expires_ms: u64,
}

impl Invite {
    /// Creates and signs an invite to `cluster`, reachable through `bootstrap`. `nonce` must
    /// be random (it is what makes each invite single-use).
    pub fn create(
        root: &SigningKey,
        cluster: &str,
        bootstrap: Vec<String>,
        grant: Grant,
        nonce: [u8; 16],
    ) -> Invite {
        // Secret as the root key is, and one per invite: derived from both.
        let claim: [u8; 32] = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(b"cloudless-invite-claim-1");
            h.update(root.to_bytes());
            h.update(nonce);
            h.finalize().into()
        };
        let token = Token {
            cluster: cluster.to_string(),
            nonce,
            expires_ms: grant.expires_ms,
            max_uses: grant.max_uses,
            roles: grant.roles,
            labels: grant.labels,
            claim_key: SigningKey::from_bytes(&claim).verifying_key().to_bytes(),
        };
        let signature = root.sign(&token.to_bytes()).to_bytes().to_vec();
        let root_key = root.verifying_key().to_bytes();
        let seal = root.sign(&sealed_bytes(&root_key, &bootstrap, &token, &signature));
        Invite { root_key, bootstrap, token, signature, seal: seal.to_bytes().to_vec(), claim }
    }

    /// The proof that device `peer` holds this invite, for its `Enroll`.
    pub fn claim_proof(&self, peer: &cloudless_types::NodeName) -> Vec<u8> {
        SigningKey::from_bytes(&self.claim).sign(&self.token.claim_bytes(peer)).to_bytes().to_vec()
    }

    /// The copy-pasteable form.
    pub fn encode(&self) -> String {
        // Encoding plain data into a Vec cannot fail.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Reads an invite (surrounding whitespace is ignored) and checks its shape and signature
    /// (not its expiry: see [`Invite::check_expiry`]; the leader checks uses).
    pub fn decode(text: &str) -> Result<Invite, InviteError> {
        let text = text.trim();
        if text.len() > MAX_INVITE {
            return Err(InviteError::TooLong(text.len()));
        }
        if text.starts_with(OLD_PREFIX) {
            return Err(InviteError::OldFormat);
        }
        let body = text.strip_prefix(PREFIX).ok_or(InviteError::NotAnInvite)?;
        let bytes =
            URL_SAFE_NO_PAD.decode(body).map_err(|e| InviteError::Damaged(e.to_string()))?;
        let invite: Invite =
            postcard::from_bytes(&bytes).map_err(|e| InviteError::Damaged(e.to_string()))?;
        if invite.bootstrap.len() > MAX_BOOTSTRAP {
            return Err(InviteError::Damaged(format!(
                "{} bootstrap addresses, at most {MAX_BOOTSTRAP}",
                invite.bootstrap.len()
            )));
        }
        let key =
            VerifyingKey::from_bytes(&invite.root_key).map_err(|_| InviteError::BadSignature)?;
        let sig =
            Signature::from_slice(&invite.signature).map_err(|_| InviteError::BadSignature)?;
        key.verify(&invite.token.to_bytes(), &sig).map_err(|_| InviteError::BadSignature)?;
        let seal = Signature::from_slice(&invite.seal).map_err(|_| InviteError::BadSignature)?;
        let sealed =
            sealed_bytes(&invite.root_key, &invite.bootstrap, &invite.token, &invite.signature);
        key.verify(&sealed, &seal).map_err(|_| InviteError::BadSignature)?;
        if SigningKey::from_bytes(&invite.claim).verifying_key().to_bytes()
            != invite.token.claim_key
        {
            return Err(InviteError::Damaged("its claim secret does not match its token".into()));
        }
        Ok(invite)
    }

    /// Refuses an invite past its expiry at `now_ms`.
    pub fn check_expiry(&self, now_ms: u64) -> Result<(), InviteError> {
        if now_ms > self.token.expires_ms {
            return Err(InviteError::Expired((now_ms - self.token.expires_ms) / 1000));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn invite() -> (SigningKey, Invite) {
        invite_with_nonce([1; 16])
    }

    fn invite_with_nonce(nonce: [u8; 16]) -> (SigningKey, Invite) {
        let root = SigningKey::from_bytes(&[7; 32]);
        let grant = Grant {
            roles: [NodeRole::Worker].into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            max_uses: 1,
            expires_ms: 2_000_000,
        };
        let boot = vec!["/ip4/127.0.0.1/udp/4001/quic-v1/p2p/12D3KooW".to_string()];
        let i = Invite::create(&root, "pool", boot, grant, nonce);
        (root, i)
    }

    #[test]
    fn a_claim_proves_the_invite_for_one_device_only() {
        let (_, i) = invite();
        let (a, b) = (
            cloudless_types::NodeName::from_ed25519([1; 32]),
            cloudless_types::NodeName::from_ed25519([2; 32]),
        );
        let proof = i.claim_proof(&a);
        assert!(i.token.verify_claim(&a, &proof));
        assert!(!i.token.verify_claim(&b, &proof), "a relay reused the proof for another id");
        assert!(!i.token.verify_claim(&a, b"junk"));
        // The token alone (what a relay sees) does not give the claim secret.
        let (_, other) = invite_with_nonce([9; 16]);
        assert!(!i.token.verify_claim(&a, &other.claim_proof(&a)));
    }

    #[test]
    fn round_trips_and_checks_signature_and_expiry() {
        let (root, i) = invite();
        let text = i.encode();
        assert!(text.starts_with(PREFIX) && text.len() < 500, "{text}");
        let back = Invite::decode(&format!("  {text}\n")).unwrap();
        assert_eq!(back, i);
        assert_eq!(back.root_key, root.verifying_key().to_bytes());
        back.check_expiry(1_999_999).unwrap();
        assert_eq!(back.check_expiry(2_010_000), Err(InviteError::Expired(10)));
    }

    #[test]
    fn tampering_is_caught() {
        let (_, mut i) = invite();
        i.token.max_uses = 100;
        assert_eq!(Invite::decode(&i.encode()), Err(InviteError::BadSignature));
        let (_, mut i) = invite();
        i.token.roles.insert(NodeRole::Voter);
        assert_eq!(Invite::decode(&i.encode()), Err(InviteError::BadSignature));
        let (_, mut i) = invite();
        i.bootstrap = vec!["/ip4/6.6.6.6/udp/1/quic-v1".into()];
        assert_eq!(Invite::decode(&i.encode()), Err(InviteError::BadSignature));
        // Signed by another key but claiming the original root key.
        let (_, good) = invite();
        let mut forged = Invite::create(
            &SigningKey::from_bytes(&[8; 32]),
            "pool",
            vec![],
            Grant {
                roles: BTreeSet::new(),
                labels: BTreeMap::new(),
                max_uses: 9,
                expires_ms: u64::MAX,
            },
            [2; 16],
        );
        forged.root_key = good.root_key;
        assert_eq!(Invite::decode(&forged.encode()), Err(InviteError::BadSignature));
        assert_eq!(Invite::decode("hello"), Err(InviteError::NotAnInvite));
        assert_eq!(Invite::decode("cloudless-invite-1.AAAA"), Err(InviteError::OldFormat));
        // Another invite's claim secret.
        let (_, mut i) = invite();
        i.claim = [3; 32];
        assert!(matches!(Invite::decode(&i.encode()), Err(InviteError::Damaged(_))));
        let text = invite().1.encode();
        assert!(matches!(Invite::decode(&text[..text.len() - 10]), Err(InviteError::Damaged(_))));
        assert!(matches!(
            Invite::decode(&"x".repeat(MAX_INVITE + 1)),
            Err(InviteError::TooLong(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any change to an invite's characters is refused, never accepted or a panic.
        #[test]
        fn damaged_invites_are_refused(pos in 0usize..10_000, c in proptest::char::range('-', 'z')) {
            let text = invite().1.encode();
            let pos = PREFIX.len() + pos % (text.len() - PREFIX.len());
            let mut chars: Vec<char> = text.chars().collect();
            prop_assume!(chars[pos] != c);
            chars[pos] = c;
            let damaged: String = chars.into_iter().collect();
            prop_assert!(Invite::decode(&damaged).is_err());
        }

        /// Arbitrary text is refused cleanly.
        #[test]
        fn arbitrary_text_is_refused(text in "\\PC{0,300}") {
            let _ = Invite::decode(&text);
            let _ = Invite::decode(&format!("{PREFIX}{text}"));
        }
    }
}
