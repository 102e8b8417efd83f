//! Verification state of foreign single-stream entries (stored, deflate,
//! single-frame zstd): DESIGN §7, "serves only verified bytes".
//!
//! Such an entry has one checksum, the CRC-32 of its whole content, so none of
//! its bytes may be served before all of them were decoded once. The first
//! read of the entry starts one *verify pass* that decodes it whole,
//! streaming, into the block cache; readers that come meanwhile join that pass
//! instead of starting another ([`Verifier::join`]). A pass records the CRC-32
//! of every block it decoded ([`BlockSums`], 4 bytes per block), so a block
//! evicted later and decoded again is checked against what the verified pass
//! saw, without a second whole pass.
//!
//! An entry whose data failed its check (after the one re-fetch the fetcher
//! allows, since the damage may have happened in transit) is *bad*: every
//! later read fails at once with [`FetchError::Damaged`]. A store error or a
//! 412 leaves the entry unverified, so the next read tries again (on the new
//! version, after a reopen).
//!
//! States are keyed by (version id, entry) like the blocks they vouch for, and
//! dropped with them ([`Verifier::drop_version`], the 412 path); a pass that
//! finishes after its version was dropped changes nothing.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;

use super::error::FetchError;

/// (object version id, entry index): whose verification a state is.
pub type EntryKey = (u64, u32);

/// The CRC-32 of each block a verified pass decoded, in block order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlockSums(Vec<u32>);

impl BlockSums {
    /// Whether `data` is exactly the block `block` the verified pass decoded.
    pub fn check(&self, block: u32, data: &[u8]) -> bool {
        self.0.get(block as usize) == Some(&crc32fast::hash(data))
    }
}

/// What a verify pass ends with: the entry's block sums, or why it has none.
pub type Verified = Result<Arc<BlockSums>, FetchError>;
/// A verify pass in flight; every reader of the entry awaits the same one.
pub type Pass = Shared<BoxFuture<'static, Verified>>;

enum State {
    Running { pass: Pass, token: u64 },
    Verified(Arc<BlockSums>),
    Bad(String),
}

/// The right of one started pass to record its outcome ([`Verifier::settle`]).
#[derive(Debug)]
pub struct Ticket {
    key: EntryKey,
    token: u64,
}

/// The verification state of every single-stream entry read so far.
#[derive(Default)]
pub struct Verifier {
    states: Mutex<HashMap<EntryKey, State>>,
    next_token: AtomicU64,
}

impl Verifier {
    /// The entry's outcome if it is known — its sums, or [`FetchError::Damaged`]
    /// — and `None` while it is unverified or its pass is running. No waiting.
    pub fn settled(&self, key: EntryKey) -> Option<Verified> {
        match self.states.lock().get(&key)? {
            State::Verified(sums) => Some(Ok(sums.clone())),
            State::Bad(reason) => Some(Err(FetchError::Damaged(reason.clone()))),
            State::Running { .. } => None,
        }
    }

    /// The entry's pass: the one running, one already settled (as a ready
    /// future), or a new one made by `start` — called under the lock, so two
    /// readers never start two passes; it must only spawn, not wait.
    pub fn join(&self, key: EntryKey, start: impl FnOnce(Ticket) -> Pass) -> Pass {
        let mut states = self.states.lock();
        let ready = |v: Verified| futures::future::ready(v).boxed().shared();
        match states.get(&key) {
            Some(State::Running { pass, .. }) => pass.clone(),
            Some(State::Verified(sums)) => ready(Ok(sums.clone())),
            Some(State::Bad(reason)) => ready(Err(FetchError::Damaged(reason.clone()))),
            None => {
                let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                let pass = start(Ticket { key, token });
                states.insert(
                    key,
                    State::Running {
                        pass: pass.clone(),
                        token,
                    },
                );
                pass
            }
        }
    }

    /// Records the outcome of the pass `ticket` was given to: verified; bad
    /// when its data failed the check; unverified again (the next read starts
    /// a new pass) after a store error or a 412. Does nothing when the state
    /// was dropped (or replaced) since the pass started.
    pub fn settle(&self, ticket: Ticket, outcome: &Verified) {
        let mut states = self.states.lock();
        if !matches!(states.get(&ticket.key), Some(State::Running { token, .. }) if *token == ticket.token)
        {
            return;
        }
        match outcome {
            Ok(sums) => {
                states.insert(ticket.key, State::Verified(sums.clone()));
            }
            Err(FetchError::Corrupt(reason) | FetchError::Damaged(reason)) => {
                states.insert(ticket.key, State::Bad(reason.clone()));
            }
            Err(
                FetchError::Store(_)
                | FetchError::ShortRead { .. }
                | FetchError::Abandoned
                | FetchError::Changed { .. }
                | FetchError::Reopened { .. },
            ) => {
                states.remove(&ticket.key);
            }
        }
    }

    /// Marks an entry bad that was found damaged outside a pass (an entry
    /// small enough to be fetched and checked whole in one piece).
    pub fn mark_bad(&self, key: EntryKey, reason: String) {
        self.states.lock().insert(key, State::Bad(reason));
    }

    /// Forgets every state of version `id` (its blocks are dropped too).
    pub fn drop_version(&self, id: u64) {
        self.states.lock().retain(|(v, _), _| *v != id);
    }
}

/// The `Write` end of a verify pass: cuts the decoded stream into blocks of
/// `block_size` bytes, records each block's CRC-32 and hands the block to
/// `emit` (the block cache). Holds at most one block itself.
pub struct BlockSink<F> {
    block_size: usize,
    buf: Vec<u8>,
    sums: Vec<u32>,
    emit: F,
}

impl<F: FnMut(u32, Bytes)> BlockSink<F> {
    pub fn new(block_size: usize, emit: F) -> Self {
        BlockSink {
            block_size,
            buf: Vec::with_capacity(block_size),
            sums: Vec::new(),
            emit,
        }
    }

    fn emit_block(&mut self) {
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(self.block_size));
        self.sums.push(crc32fast::hash(&block));
        (self.emit)(self.sums.len() as u32 - 1, Bytes::from(block));
    }

    /// Emits the last, shorter block; the sums of every block emitted.
    pub fn finish(mut self) -> BlockSums {
        if !self.buf.is_empty() {
            self.emit_block();
        }
        BlockSums(self.sums)
    }
}

impl<F: FnMut(u32, Bytes)> Write for BlockSink<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.block_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.block_size {
            self.emit_block();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use std::sync::atomic::AtomicUsize;

    fn sums_of(blocks: &[&[u8]]) -> Arc<BlockSums> {
        Arc::new(BlockSums(
            blocks.iter().map(|b| crc32fast::hash(b)).collect(),
        ))
    }

    /// A pass that is already finished with `outcome`, counting its starts.
    fn start_with<'a>(
        starts: &'a AtomicUsize,
        outcome: Verified,
        ticket: &'a mut Option<Ticket>,
    ) -> impl FnOnce(Ticket) -> Pass + 'a {
        move |t| {
            starts.fetch_add(1, Ordering::Relaxed);
            *ticket = Some(t);
            futures::future::ready(outcome).boxed().shared()
        }
    }

    #[test]
    fn concurrent_readers_join_one_pass_and_see_its_sums() {
        let v = Verifier::default();
        let starts = AtomicUsize::new(0);
        let sums = sums_of(&[b"one", b"two"]);
        let mut ticket = None;
        let first = v.join((1, 7), start_with(&starts, Ok(sums.clone()), &mut ticket));
        // While it runs: not settled, and a second reader joins the same pass.
        assert!(v.settled((1, 7)).is_none());
        let mut unused = None;
        let second = v.join((1, 7), start_with(&starts, Ok(sums.clone()), &mut unused));
        assert_eq!(starts.load(Ordering::Relaxed), 1, "a second pass started");
        assert!(unused.is_none());
        let outcome = futures::executor::block_on(first);
        assert_eq!(futures::executor::block_on(second).unwrap(), sums);
        v.settle(ticket.unwrap(), &outcome);
        let got = v.settled((1, 7)).unwrap().unwrap();
        assert!(got.check(1, b"two") && !got.check(1, b"twO") && !got.check(2, b""));
        // Settled: joining starts nothing.
        let mut unused = None;
        let again = v.join((1, 7), start_with(&starts, Err(bad()), &mut unused));
        assert!(futures::executor::block_on(again).is_ok());
        assert_eq!(starts.load(Ordering::Relaxed), 1);
    }

    fn bad() -> FetchError {
        FetchError::Corrupt("corrupt data in _0/big: CRC-32 1 does not match 2".into())
    }

    #[test]
    fn a_failed_check_marks_the_entry_bad_for_every_later_read() {
        let v = Verifier::default();
        let starts = AtomicUsize::new(0);
        let mut ticket = None;
        let pass = v.join((1, 0), start_with(&starts, Err(bad()), &mut ticket));
        let outcome = futures::executor::block_on(pass);
        v.settle(ticket.unwrap(), &outcome);
        for _ in 0..2 {
            match v.settled((1, 0)) {
                Some(Err(FetchError::Damaged(reason))) => assert!(reason.contains("_0/big")),
                _ => panic!("entry not bad"),
            }
            let mut unused = None;
            let joined = v.join((1, 0), start_with(&starts, Ok(sums_of(&[])), &mut unused));
            assert!(matches!(
                futures::executor::block_on(joined),
                Err(FetchError::Damaged(_))
            ));
        }
        assert_eq!(
            starts.load(Ordering::Relaxed),
            1,
            "a bad entry was verified again"
        );
        v.mark_bad((1, 3), "small".into());
        assert!(matches!(
            v.settled((1, 3)),
            Some(Err(FetchError::Damaged(_)))
        ));
    }

    #[test]
    fn a_store_error_or_412_leaves_the_entry_to_verify_again() {
        for err in [
            FetchError::Store(Arc::new(StoreError::NoSuchBucket("b".into()))),
            FetchError::Reopened {
                key: "k".into(),
                name: "n".into(),
            },
        ] {
            let v = Verifier::default();
            let starts = AtomicUsize::new(0);
            let mut ticket = None;
            let outcome = Err(err);
            drop(v.join((1, 0), start_with(&starts, outcome.clone(), &mut ticket)));
            v.settle(ticket.unwrap(), &outcome);
            assert!(v.settled((1, 0)).is_none());
            let mut next = None;
            drop(v.join((1, 0), start_with(&starts, Ok(sums_of(&[])), &mut next)));
            assert_eq!(starts.load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn dropping_a_version_drops_its_states_and_a_late_pass_changes_nothing() {
        let v = Verifier::default();
        let starts = AtomicUsize::new(0);
        let (mut old, mut kept) = (None, None);
        let outcome = Ok(sums_of(&[b"x"]));
        drop(v.join((1, 0), start_with(&starts, outcome.clone(), &mut old)));
        drop(v.join((2, 0), start_with(&starts, outcome.clone(), &mut kept)));
        v.settle(kept.unwrap(), &outcome);
        v.drop_version(1);
        // The pass of the dropped version ends after the drop: no state comes back.
        v.settle(old.unwrap(), &outcome);
        assert!(v.settled((1, 0)).is_none());
        assert!(v.settled((2, 0)).is_some());
        v.drop_version(2);
        assert!(v.settled((2, 0)).is_none());
    }

    #[test]
    fn the_sink_cuts_blocks_and_sums_each() {
        let mut emitted = Vec::new();
        let mut sink = BlockSink::new(4, |i, b: Bytes| emitted.push((i, b)));
        // Writes that straddle block ends, as a decoder's output does.
        let data = b"abcdefghij";
        let mut at = 0;
        for step in [3, 5, 2] {
            let mut chunk = &data[at..at + step];
            while !chunk.is_empty() {
                let n = sink.write(chunk).unwrap();
                chunk = &chunk[n..];
            }
            at += step;
        }
        let sums = sink.finish();
        assert_eq!(sums, *sums_of(&[b"abcd", b"efgh", b"ij"]));
        let blocks: Vec<(u32, &[u8])> = emitted.iter().map(|(i, b)| (*i, &b[..])).collect();
        assert_eq!(
            blocks,
            [(0, &b"abcd"[..]), (1, &b"efgh"[..]), (2, &b"ij"[..])]
        );
    }
}
