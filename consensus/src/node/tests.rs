//! The checks a member makes on messages from other members before raft sees them.

#![allow(clippy::unwrap_used)]

use cloudless_api::SignedRequest;
use ed25519_dalek::SigningKey;

use super::*;
use crate::state::Role;

fn n(label: u8) -> NodeName {
    NodeName::from_ed25519([label; 32])
}

const MIB: usize = 1024 * 1024;
/// The cluster's root public key.
const ROOT: [u8; 32] = [7; 32];

#[test]
fn chunks_must_follow_each_other() {
    let c = Chunks::default();
    c.check("s1", 0, MIB, false).unwrap();
    c.check("s1", MIB as u64, MIB, false).unwrap();
    // A resend of the last chunk (its answer was lost) is let in again.
    c.check("s1", MIB as u64, MIB, false).unwrap();
    // A gap is not.
    let gap = c.check("s1", 3 * MIB as u64, 10, false).unwrap_err();
    assert_eq!(gap, Refused::Chunk { offset: 3 * MIB as u64, len: 10, expected: 2 * MIB as u64 });
    // Nor a chunk of another snapshot that does not start it.
    assert!(c.check("s2", 2 * MIB as u64, 10, false).is_err());
    c.check("s1", 2 * MIB as u64, 10, true).unwrap();
    // Once done, only a new snapshot's first chunk.
    assert!(c.check("s1", 2 * MIB as u64 + 10, 10, false).is_err());
    c.check("s2", 0, 10, true).unwrap();
}

#[test]
fn chunks_far_away_or_past_the_bound_are_refused() {
    let c = Chunks::default();
    // The seek that would make this member allocate a terabyte.
    assert!(c.check("s", 1 << 40, 1, false).is_err());
    assert!(c.check("s", u64::MAX, usize::MAX, false).is_err());
    // A first chunk bigger than the whole bound.
    assert!(c.check("s", 0, MAX_SNAPSHOT as usize + 1, false).is_err());
    // Right up to the bound is fine, one byte more is not.
    c.check("s", 0, MAX_SNAPSHOT as usize - 1, false).unwrap();
    assert!(c.check("s", MAX_SNAPSHOT - 1, 2, false).is_err());
    c.check("s", MAX_SNAPSHOT - 1, 1, true).unwrap();
}

fn request(actor: Actor, command: Command) -> Request {
    Request { client: 5, serial: 9, actor, time_ms: 1_000_000, command, proof: None }
}

fn put_user() -> Command {
    Command::PutUser { key: [4; 32], name: "eve".into(), role: Role::Admin }
}

fn signed_by(user: &SigningKey, command: Command) -> Request {
    let r = request(Actor::User(user.verifying_key().to_bytes()), command.clone());
    let proof = SignedRequest::sign(
        user,
        ROOT,
        r.client,
        r.serial,
        r.time_ms,
        UserRequest::Command(command.clone()),
    );
    Request::from_signed(proof, command, r.time_ms)
}

#[test]
fn a_member_forwards_for_itself_and_signed_users_only() {
    let me = n(1);
    let now = 1_000_000;
    let system = request(Actor::System, put_user());
    assert!(forwarded_for(&me, &system, Some(&ROOT), now).is_err(), "never as the system");
    let other = request(Actor::Node(n(2)), Command::Report(Vec::new()));
    assert!(forwarded_for(&me, &other, Some(&ROOT), now).is_err(), "never for another node");
    let itself = request(Actor::Node(me.clone()), Command::Report(Vec::new()));
    forwarded_for(&me, &itself, Some(&ROOT), now).unwrap();

    let alice = SigningKey::from_bytes(&[3; 32]);
    let unsigned = request(Actor::User(alice.verifying_key().to_bytes()), put_user());
    assert!(
        forwarded_for(&me, &unsigned, Some(&ROOT), now).is_err(),
        "a user's command needs its proof"
    );
    let good = signed_by(&alice, put_user());
    forwarded_for(&me, &good, Some(&ROOT), now).unwrap();
}

#[test]
fn a_proof_must_be_the_forwarded_request() {
    let me = n(1);
    let now = 1_000_000;
    let alice = SigningKey::from_bytes(&[3; 32]);
    let good = signed_by(&alice, Command::Report(Vec::new()));
    // The proof of one command cannot carry another.
    let mut swapped = good.clone();
    swapped.command = put_user();
    assert!(forwarded_for(&me, &swapped, Some(&ROOT), now).is_err());
    // Nor another session or request number (a replay into someone's session).
    let mut moved = good.clone();
    moved.client = 6;
    assert!(forwarded_for(&me, &moved, Some(&ROOT), now).is_err());
    let mut renumbered = good.clone();
    renumbered.serial = 10;
    assert!(forwarded_for(&me, &renumbered, Some(&ROOT), now).is_err());
    // Nor another actor.
    let mut borrowed = good.clone();
    borrowed.actor = Actor::User([8; 32]);
    assert!(forwarded_for(&me, &borrowed, Some(&ROOT), now).is_err());
    // A proof whose key was swapped for the actor's no longer verifies.
    let mut forged = good.clone();
    if let Some(p) = forged.proof.as_mut() {
        p.key = [8; 32];
    }
    forged.actor = Actor::User([8; 32]);
    assert!(forwarded_for(&me, &forged, Some(&ROOT), now).is_err());
    // A proof signed for another cluster is refused (a replay from there).
    assert!(forwarded_for(&me, &good, Some(&[9; 32]), now).is_err());
    assert!(forwarded_for(&me, &good, None, now).is_err());
    // A proof signed long ago is refused (a replay).
    assert!(forwarded_for(&me, &good, Some(&ROOT), now + 24 * 3600 * 1000).is_err());
}
