//! An in-memory [`Transport`] with faults, for tests and simulations: members in one process,
//! messages serialized and deserialized as on a real wire, and a switchboard that can drop,
//! delay, cut members off, and partition them (both ways or one way).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cloudless_types::NodeName;

use crate::Member;
use crate::network::{Answer, Message, Transport, TransportError};
use crate::node::Consensus;

#[derive(Default)]
struct Switchboard {
    members: HashMap<NodeName, Consensus<MemTransport>>,
    down: HashSet<NodeName>,
    /// (from, to) pairs whose messages are lost.
    cut: HashSet<(NodeName, NodeName)>,
    drop_percent: u32,
    delay: Duration,
    seed: u64,
}

/// The shared network; clone it freely.
#[derive(Clone, Default)]
pub struct MemNet {
    board: Arc<RwLock<Switchboard>>,
    rng: Arc<Mutex<u64>>,
}

/// One member's side of the [`MemNet`].
#[derive(Clone)]
pub struct MemTransport {
    me: NodeName,
    net: MemNet,
}

impl MemNet {
    /// A network without members or faults.
    pub fn new() -> Self {
        MemNet::default()
    }

    /// The transport for member `peer`.
    pub fn transport(&self, peer: &NodeName) -> MemTransport {
        MemTransport { me: peer.clone(), net: self.clone() }
    }

    fn board(&self) -> std::sync::RwLockWriteGuard<'_, Switchboard> {
        self.board.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects a started member.
    pub fn register(&self, c: Consensus<MemTransport>) {
        let mut b = self.board();
        b.down.remove(&c.member().peer);
        b.members.insert(c.member().peer.clone(), c);
    }

    /// Disconnects a member (crashed or shut down): nothing reaches it any more.
    pub fn remove(&self, peer: &NodeName) -> Option<Consensus<MemTransport>> {
        let mut b = self.board();
        b.down.insert(peer.clone());
        b.members.remove(peer)
    }

    /// Cuts every link between `a` and `b` members, both ways.
    pub fn partition(&self, a: &[&NodeName], b: &[&NodeName]) {
        let mut board = self.board();
        for x in a {
            for y in b {
                board.cut.insert(((*x).clone(), (*y).clone()));
                board.cut.insert(((*y).clone(), (*x).clone()));
            }
        }
    }

    /// Loses messages from `from` to `to` (and answers going that way), not the reverse.
    pub fn cut_one_way(&self, from: &NodeName, to: &NodeName) {
        self.board().cut.insert((from.clone(), to.clone()));
    }

    /// Removes every partition.
    pub fn heal(&self) {
        self.board().cut.clear();
    }

    /// Loses this share of messages (0–100), independently.
    pub fn set_drop_percent(&self, p: u32, seed: u64) {
        let mut b = self.board();
        b.drop_percent = p.min(100);
        b.seed = seed;
        *self.rng.lock().unwrap_or_else(|p| p.into_inner()) = seed | 1;
    }

    /// Delays every message by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.board().delay = d;
    }

    fn roll(&self) -> u32 {
        let mut x = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        // xorshift64: deterministic per seed.
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x % 100) as u32
    }
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> Result<T, String> {
    let bytes = postcard::to_allocvec(v).map_err(|e| e.to_string())?;
    postcard::from_bytes(&bytes).map_err(|e| e.to_string())
}

impl Transport for MemTransport {
    async fn call(
        &self,
        to: &Member,
        message: Message,
        timeout: Duration,
    ) -> Result<Answer, TransportError> {
        let (target, delay, drop_percent, cut_there, cut_back) = {
            let b = self.net.board.read().unwrap_or_else(|p| p.into_inner());
            let target =
                if b.down.contains(&self.me) { None } else { b.members.get(&to.peer).cloned() };
            (
                target,
                b.delay,
                b.drop_percent,
                b.cut.contains(&(self.me.clone(), to.peer.clone())),
                b.cut.contains(&(to.peer.clone(), self.me.clone())),
            )
        };
        let unreachable = |reason: &str| TransportError::Unreachable {
            peer: to.peer.to_string(),
            reason: reason.to_string(),
        };
        let Some(target) = target else { return Err(unreachable("not running")) };
        if cut_there {
            return Err(unreachable("partitioned"));
        }
        if drop_percent > 0 && self.net.roll() < drop_percent {
            return Err(TransportError::Failed {
                peer: to.peer.to_string(),
                reason: "message lost".into(),
            });
        }
        let message = roundtrip(&message)
            .map_err(|reason| TransportError::Failed { peer: to.peer.to_string(), reason })?;
        let exchange = async {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            target.handle(&self.me, message).await
        };
        let answer =
            tokio::time::timeout(timeout, exchange).await.map_err(|_| TransportError::Failed {
                peer: to.peer.to_string(),
                reason: format!("no answer within {timeout:?}"),
            })?;
        let answer = answer.map_err(|e| TransportError::Failed {
            peer: to.peer.to_string(),
            reason: format!("refused: {e}"),
        })?;
        if cut_back {
            // The request arrived; the answer is lost on the way back.
            return Err(TransportError::Failed {
                peer: to.peer.to_string(),
                reason: "answer lost".into(),
            });
        }
        roundtrip(&answer)
            .map_err(|reason| TransportError::Failed { peer: to.peer.to_string(), reason })
    }
}
