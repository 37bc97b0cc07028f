//! Module uploads being reassembled, as a pure table: chunks in order, per uploader, bounded in
//! count, size and idle time. The handler stores a complete module (and checks its hash)
//! outside the table.
//!
//! ```text
//!   Upload { hash, total, offset, bytes } ──▶ Uploads::chunk(user, upload, now)
//!        ──▶ Partial(received) │ Complete(bytes) │ Err(ApiError: invalid, busy, conflict)
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cloudless_api::user::Upload;
use cloudless_api::{ApiError, CHUNK, MAX_MODULE, UserKey};
use cloudless_types::ModuleHash;

/// Uploads in progress at once, per node: a few users publishing at once, and a bound on the
/// memory uploads hold (4 × 64 MiB at worst).
pub const MAX_UPLOADS: usize = 4;
/// An upload that received nothing for this long is dropped: far longer than a chunk takes
/// on any link, short enough that an abandoned upload frees its slot soon.
pub const UPLOAD_IDLE: Duration = Duration::from_secs(60);

struct Partial {
    total: u64,
    bytes: Vec<u8>,
    touched: Instant,
}

/// Modules being uploaded, by uploader and hash.
#[derive(Default)]
pub struct Uploads(BTreeMap<(UserKey, ModuleHash), Partial>);

/// What a chunk achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes have arrived so far.
    Partial(u64),
    /// Every byte has arrived: the module, to be checked against its hash and stored.
    Complete(Vec<u8>),
}

impl Uploads {
    /// Takes one chunk from `user`.
    pub fn chunk(&mut self, user: UserKey, up: Upload, now: Instant) -> Result<Progress, ApiError> {
        let Upload { hash, total, offset, bytes } = up;
        if total == 0 || total > MAX_MODULE {
            return Err(ApiError::invalid(format!(
                "a module must be 1 byte to {MAX_MODULE} bytes, not {total}"
            )));
        }
        if bytes.len() > CHUNK {
            return Err(ApiError::invalid(format!(
                "chunks are at most {CHUNK} bytes, not {}",
                bytes.len()
            )));
        }
        self.0.retain(|_, u| now.saturating_duration_since(u.touched) < UPLOAD_IDLE);
        // Per uploader: one user restarting an upload does not reset another's.
        let slot = (user, hash.clone());
        if offset == 0 {
            if !self.0.contains_key(&slot) && self.0.len() >= MAX_UPLOADS {
                return Err(ApiError::busy(format!(
                    "{MAX_UPLOADS} uploads are in progress here; retry shortly"
                )));
            }
            self.0.insert(slot.clone(), Partial { total, bytes: Vec::new(), touched: now });
        }
        let Some(u) = self.0.get_mut(&slot) else {
            return Err(ApiError::conflict(format!(
                "no upload of {hash} in progress; start at offset 0"
            )));
        };
        let have = u.bytes.len() as u64;
        if u.total != total || have != offset {
            return Err(ApiError::conflict(format!(
                "upload of {hash}: expected offset {have} of {}, got offset {offset} of {total}",
                u.total
            )));
        }
        if offset.saturating_add(bytes.len() as u64) > total {
            return Err(ApiError::invalid(format!(
                "upload of {hash}: chunk goes past the total of {total} bytes"
            )));
        }
        u.bytes.extend_from_slice(&bytes);
        u.touched = now;
        let received = u.bytes.len() as u64;
        if received < total {
            return Ok(Progress::Partial(received));
        }
        match self.0.remove(&slot) {
            Some(done) => Ok(Progress::Complete(done.bytes)),
            None => Err(ApiError::internal("the upload vanished")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(bytes: &[u8], offset: u64, total: u64) -> Upload {
        Upload { hash: ModuleHash::of(b"whole"), total, offset, bytes: bytes.to_vec() }
    }

    #[test]
    fn chunks_in_order_make_a_module() {
        let mut u = Uploads::default();
        let now = Instant::now();
        assert_eq!(u.chunk([1; 32], up(b"who", 0, 5), now).unwrap(), Progress::Partial(3));
        assert_eq!(
            u.chunk([1; 32], up(b"le", 3, 5), now).unwrap(),
            Progress::Complete(b"whole".to_vec())
        );
    }

    #[test]
    fn bad_chunks_are_refused_and_change_nothing() {
        let mut u = Uploads::default();
        let now = Instant::now();
        u.chunk([1; 32], up(b"who", 0, 5), now).unwrap();
        let gap = u.chunk([1; 32], up(b"e", 4, 5), now).unwrap_err();
        assert_eq!(gap.kind, cloudless_api::ErrorKind::Conflict, "{gap}");
        assert!(u.chunk([1; 32], up(b"lexx", 3, 5), now).is_err(), "past the total");
        assert!(u.chunk([2; 32], up(b"le", 3, 5), now).is_err(), "another user's upload");
        assert!(u.chunk([1; 32], up(b"", 0, 0), now).is_err(), "empty");
        assert!(u.chunk([1; 32], up(b"", 0, MAX_MODULE + 1), now).is_err(), "too big");
        assert_eq!(
            u.chunk([1; 32], up(b"le", 3, 5), now).unwrap(),
            Progress::Complete(b"whole".to_vec())
        );
    }

    #[test]
    fn uploads_are_bounded_and_idle_ones_expire() {
        let mut u = Uploads::default();
        let now = Instant::now();
        for k in 0..MAX_UPLOADS as u8 {
            u.chunk([k; 32], up(b"w", 0, 5), now).unwrap();
        }
        let full = u.chunk([99; 32], up(b"w", 0, 5), now).unwrap_err();
        assert_eq!(full.kind, cloudless_api::ErrorKind::Busy);
        let later = now + UPLOAD_IDLE;
        assert!(u.chunk([99; 32], up(b"w", 0, 5), later).is_ok(), "idle uploads were dropped");
    }

    proptest::proptest! {
        /// Whatever chunks arrive, the table never holds more than its bound nor panics.
        #[test]
        fn arbitrary_chunks_keep_the_bounds(
            chunks in proptest::collection::vec((0u8..8, 0u64..64, 0usize..32, 1u64..64), 0..64)
        ) {
            let mut u = Uploads::default();
            let now = Instant::now();
            for (user, offset, len, total) in chunks {
                let _ = u.chunk([user; 32], up(&vec![0; len], offset, total), now);
                proptest::prop_assert!(u.0.len() <= MAX_UPLOADS);
                for p in u.0.values() {
                    proptest::prop_assert!(p.bytes.len() as u64 <= p.total);
                }
            }
        }
    }
}
