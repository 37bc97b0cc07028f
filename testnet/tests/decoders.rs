//! Every decoder that takes bytes from the network, fed arbitrary bytes and damaged valid
//! messages: it returns a value or an error, never panics, and never allocates more than
//! [`ALLOC_PER_BYTE`] times its input plus [`ALLOC_FIXED`].
//!
//! The fixed part is serde's cautious preallocation: a sequence that claims more elements
//! than it holds gets at most 1 MiB reserved before the decoder finds out; a message nests at
//! most a few sequences. What each decoder may be given is bounded before it runs (frames and
//! datagrams by the mesh's limits, strangers' by their budgets), so the bound holds per read.
//!
//! One test in this binary: the allocator's counters are process-wide.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::alloc::System;

use cloudless_api::node::{Assigned, Assignment, Chunk, EnrolledList};
use cloudless_api::{ApiError, NodeRequest, Request};
use cloudless_consensus::state::Batch;
use cloudless_consensus::{Answer as RaftAnswer, Message as RaftMessage};
use cloudless_mesh::directory;
use cloudless_mesh::membership::{Message, Update, UpdateKind};
use cloudless_mesh::node::Datagram;
use cloudless_mesh::rpc::{Envelope, Reply};
use libp2p::PeerId;
use libp2p::core::SignedEnvelope;
use proptest::prelude::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes a decoder may allocate per byte of input (decoded values are larger than their
/// encoding: a one-byte enum tag becomes a word, a varint a `u64`, a byte string a `Vec`).
const ALLOC_PER_BYTE: usize = 64;
/// Bytes a decoder may allocate whatever its input: serde reserves at most 1 MiB for a
/// sequence whose claimed length it cannot check yet, and a message nests a few.
const ALLOC_FIXED: usize = 4 << 20;

/// One decoder: a name, and a function that decodes bytes (dropping the result).
type Decoder = (&'static str, fn(&[u8]) -> bool);

fn decoders() -> Vec<Decoder> {
    fn postcard_of<T: serde::de::DeserializeOwned>(b: &[u8]) -> bool {
        postcard::from_bytes::<T>(b).is_ok()
    }
    vec![
        ("datagram (membership, directory)", postcard_of::<Datagram>),
        ("membership flood", postcard_of::<Vec<Update<PeerId>>>),
        ("rpc envelope", postcard_of::<Envelope>),
        ("rpc reply", postcard_of::<Reply>),
        ("api request", postcard_of::<Request>),
        ("api answer: assignments", postcard_of::<Result<Vec<Assignment>, ApiError>>),
        ("api answer: enrolled list", postcard_of::<Result<EnrolledList, ApiError>>),
        ("api answer: module chunk", postcard_of::<Result<Chunk, ApiError>>),
        ("raft message", postcard_of::<RaftMessage>),
        ("raft answer", postcard_of::<RaftAnswer>),
        ("directory entry", |b| SignedEnvelope::from_protobuf_encoding(b).is_ok()),
    ]
}

/// Valid encodings, to damage.
fn samples() -> Vec<Vec<u8>> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let seal = cloudless_mesh::identity::KeySeal::new(key.clone());
    let updates = vec![
        Update::signed(peer, 3, UpdateKind::Alive, &seal),
        Update::signed(peer, 4, UpdateKind::Suspect { by: peer, witnesses: 2 }, &seal),
    ];
    let entry = SignedEnvelope::new(&key, "d".into(), b"t".to_vec(), vec![7; 40])
        .unwrap()
        .into_protobuf_encoding();
    let vote = openraft::Vote::new(1, 7);
    vec![
        postcard::to_allocvec(&Datagram::Membership(Message::Ping {
            seq: 1,
            incarnation: 2,
            updates: updates.clone(),
        }))
        .unwrap(),
        postcard::to_allocvec(&Datagram::Directory(directory::Message::Entries(vec![
            entry.clone(),
        ])))
        .unwrap(),
        postcard::to_allocvec(&Datagram::Directory(directory::Message::Versions {
            after: None,
            upto: Some(peer),
            versions: vec![directory::Version { peer, version: 9, hash: [1; 32] }],
            reply: true,
        }))
        .unwrap(),
        postcard::to_allocvec(&updates).unwrap(),
        postcard::to_allocvec(&Envelope { service: "api".into(), body: vec![1, 2, 3] }).unwrap(),
        postcard::to_allocvec(&Request::Node(NodeRequest::Assigned(Assigned::default()))).unwrap(),
        postcard::to_allocvec(&RaftMessage::Vote(openraft::raft::VoteRequest::new(vote, None)))
            .unwrap(),
        postcard::to_allocvec(&RaftMessage::Forward(Batch(vec![]))).unwrap(),
        entry,
    ]
}

/// Decodes `bytes` with every decoder; returns the most any allocated, and checks the bound.
fn check(bytes: &[u8]) -> Result<usize, TestCaseError> {
    let mut most = 0;
    for (name, decode) in decoders() {
        let region = Region::new(GLOBAL);
        let _ = decode(bytes);
        let allocated = region.change().bytes_allocated;
        most = most.max(allocated);
        let bound = ALLOC_PER_BYTE * bytes.len() + ALLOC_FIXED;
        prop_assert!(
            allocated <= bound,
            "{name}: {} bytes in, {allocated} allocated (bound {bound})",
            bytes.len()
        );
    }
    Ok(most)
}

/// A damaged copy of a sample: bytes replaced, a huge length prefix spliced in, cut short.
fn damaged() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<prop::sample::Index>(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        prop::option::of(any::<prop::sample::Index>()),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(|(which, edits, splice, cut)| {
            let all = samples();
            let mut b = which.get(&all).clone();
            for (at, v) in edits {
                let i = at.index(b.len());
                b[i] = v;
            }
            if let Some(at) = splice {
                // A varint claiming ~4 billion elements.
                let i = at.index(b.len());
                b.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
            }
            if let Some(at) = cut {
                b.truncate(at.index(b.len() + 1));
            }
            b
        })
}

#[test]
fn network_decoders_neither_panic_nor_allocate_beyond_their_bound() {
    // Every sample decodes with at least one decoder: the damaged copies start from real
    // messages.
    for s in samples() {
        assert!(decoders().iter().any(|(_, d)| d(&s)), "a sample decodes with nothing");
    }
    let config = ProptestConfig { cases: 2048, ..ProptestConfig::default() };
    let most = std::cell::Cell::new(0usize);
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let inputs = prop_oneof![prop::collection::vec(any::<u8>(), 0..4096), damaged()];
    runner
        .run(&inputs, |bytes| {
            most.set(most.get().max(check(&bytes)?));
            Ok(())
        })
        .unwrap();
    eprintln!("decoders: the most any decoder allocated for one input: {} bytes", most.get());
}
