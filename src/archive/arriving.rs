//! Decoding a stored index while it downloads, so that a mount's start-up
//! waits after the last byte only for the last chunks' decoding, not for
//! all of it.
//!
//! The download hands over its pieces in order and, once the archive's end
//! records are read, the bound they set ([`IndexBound`]). The decoder hashes
//! each piece as it comes and, for a chunked index ([`super::chunks`]),
//! decodes each chunk on the thread pool as soon as its frame is whole and
//! the bound is known: nothing the table declares is allocated before the
//! bound has checked it. An index of one frame is decoded once it is whole.
//!
//! The bytes are unverified while they arrive (the download is unpinned:
//! the version is not known yet). Decoding them is safe, bounded like any
//! decoding of store bytes, and the caller takes the result only when the
//! digest returned is the one the archive's pinned end record names.

use std::sync::mpsc::Receiver;

use bytes::{Buf, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::chunks::{self, Head};
use super::index::ArchiveIndex;
use super::limits::IndexBound;
use super::FormatError;

/// What a download hands the decoder: the bytes in order, and the bound once
/// the end records are read (before, between or after the pieces).
pub enum Arrival {
    Piece(Bytes),
    Bound(IndexBound),
}

/// A stored index that arrived whole.
pub struct Arrived {
    /// SHA-256 (hex) of its bytes.
    pub digest: String,
    /// Their decoding, within the bound.
    pub index: Result<ArchiveIndex, FormatError>,
}

/// Decodes the `len` bytes of a stored index as `arrivals` bring them, on
/// this thread and rayon's. None when the arrivals end before all `len`
/// bytes and a bound have come, or bring more than `len` bytes: the download
/// failed, or its caller found they are not the bytes it wants.
pub fn decode_arriving(arrivals: Receiver<Arrival>, len: usize) -> Option<Arrived> {
    let mut feed = Feed {
        arrivals,
        pending: BytesMut::with_capacity(len),
        hasher: Sha256::new(),
        received: 0,
        len,
        bound: None,
    };
    let head = loop {
        match chunks::read_head(&feed.pending, len) {
            Ok(Head::Incomplete) => {
                if !feed.next() {
                    return None;
                }
            }
            other => break other,
        }
    };
    let index = match head {
        Err(e) => Err(e),
        // (Never Incomplete here: the loop above waited that out.)
        Ok(Head::OneFrame | Head::Incomplete) => {
            if !feed.wait_for(len) {
                return None;
            }
            ArchiveIndex::decompress(&feed.pending, feed.bound?)
        }
        Ok(Head::Chunked { frames_at, shapes }) => {
            if !feed.wait_for(frames_at) {
                return None;
            }
            feed.pending.advance(frames_at);
            let bound = feed.bound?;
            let mut complete = true;
            let index = chunks::decode_into_parts(&shapes, bound, |parts| {
                let results = parking_lot::Mutex::new(Vec::from_iter(parts.iter().map(|_| None)));
                rayon::in_place_scope(|scope| {
                    for (i, (shape, part)) in shapes.iter().zip(parts).enumerate() {
                        if !feed.wait_for(shape.size) {
                            complete = false;
                            break;
                        }
                        let frame = feed.pending.split_to(shape.size).freeze();
                        let (shape, results) = (*shape, &results);
                        scope.spawn(move |_| {
                            let decoded = chunks::decode_chunk(&frame, shape, part, i == 0, bound);
                            results.lock()[i] = Some(decoded);
                        });
                    }
                });
                results.into_inner().into_iter().map_while(|r| r).collect()
            });
            if !complete {
                return None;
            }
            index
        }
    };
    let digest = feed.finish()?;
    Some(Arrived { digest, index })
}

/// The arrivals so far: the bytes not yet handed to a decoder, the hash of
/// all of them, and the bound once it came.
struct Feed {
    arrivals: Receiver<Arrival>,
    pending: BytesMut,
    hasher: Sha256,
    received: usize,
    len: usize,
    bound: Option<IndexBound>,
}

impl Feed {
    /// Takes the next arrival; false when there are no more, or too many bytes.
    fn next(&mut self) -> bool {
        match self.arrivals.recv() {
            Ok(Arrival::Piece(piece)) => {
                self.received += piece.len();
                if self.received > self.len {
                    return false;
                }
                self.hasher.update(&piece);
                self.pending.extend_from_slice(&piece);
                true
            }
            Ok(Arrival::Bound(bound)) => {
                self.bound = Some(bound);
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until `n` bytes are pending and the bound is known; false when
    /// the arrivals end first.
    fn wait_for(&mut self, n: usize) -> bool {
        while self.pending.len() < n || self.bound.is_none() {
            if !self.next() {
                return false;
            }
        }
        true
    }

    /// The digest of all `len` bytes, once they have come.
    fn finish(mut self) -> Option<String> {
        while self.received < self.len {
            if !self.next() {
                return None;
            }
        }
        Some(hex::encode(self.hasher.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::chunks::tests::index_of;
    use crate::archive::index::digest;
    use std::sync::mpsc;

    /// Sends `stored` in pieces of `piece` bytes, the bound after piece
    /// number `bound_after` (when given), then decodes it.
    fn arrive(
        stored: &[u8],
        piece: usize,
        bound_after: Option<usize>,
        bound: IndexBound,
    ) -> Option<Arrived> {
        let (tx, rx) = mpsc::channel();
        let len = stored.len();
        let stored = Bytes::copy_from_slice(stored);
        let sender = std::thread::spawn(move || {
            let pieces: Vec<Bytes> = (0..len)
                .step_by(piece)
                .map(|at| stored.slice(at..(at + piece).min(len)))
                .collect();
            for (i, p) in pieces.into_iter().enumerate() {
                if bound_after == Some(i) {
                    let _ = tx.send(Arrival::Bound(bound));
                }
                let _ = tx.send(Arrival::Piece(p));
            }
            if bound_after.is_some_and(|i| i >= len.div_ceil(piece)) {
                let _ = tx.send(Arrival::Bound(bound));
            }
        });
        let arrived = decode_arriving(rx, len);
        sender.join().unwrap();
        arrived
    }

    #[test]
    fn an_index_decodes_the_same_however_it_arrives() {
        for n in [10, 20_000] {
            let index = index_of(n);
            let stored = index.to_stored();
            let whole = digest(&stored);
            for (piece, bound_after) in [
                (7, Some(0)),
                (65_536, Some(3)),
                (1 << 20, Some(99)),
                (stored.len(), Some(1)),
            ] {
                let arrived = arrive(&stored, piece, bound_after, IndexBound::MAX)
                    .unwrap_or_else(|| panic!("{n} entries, pieces of {piece}"));
                assert_eq!(arrived.digest, whole);
                assert_eq!(
                    arrived.index.unwrap(),
                    index,
                    "{n} entries, pieces of {piece}"
                );
            }
        }
    }

    /// A download that breaks off, or never learns its bound, gives nothing
    /// (and leaks nothing of what its chunks decoded).
    #[test]
    fn an_incomplete_arrival_gives_nothing() {
        let stored = index_of(20_000).to_stored();
        assert!(arrive(&stored, 65_536, None, IndexBound::MAX).is_none());
        let cut = &stored[..stored.len() - 1];
        let (tx, rx) = mpsc::channel();
        tx.send(Arrival::Bound(IndexBound::MAX)).unwrap();
        tx.send(Arrival::Piece(Bytes::copy_from_slice(cut)))
            .unwrap();
        drop(tx);
        assert!(decode_arriving(rx, stored.len()).is_none());
        // More bytes than the range holds.
        let (tx, rx) = mpsc::channel();
        tx.send(Arrival::Bound(IndexBound::MAX)).unwrap();
        tx.send(Arrival::Piece(Bytes::copy_from_slice(&stored)))
            .unwrap();
        drop(tx);
        assert!(decode_arriving(rx, stored.len() - 1).is_none());
    }

    /// The bound checks what the table declares, as for an index read whole,
    /// and the digest is still reported so the caller can tell damage from
    /// a wrong guess.
    #[test]
    fn the_bound_is_checked_before_the_chunks_are_decoded() {
        let stored = index_of(20_000).to_stored();
        let bound = IndexBound {
            entries: 19_999,
            ..IndexBound::MAX
        };
        let arrived = arrive(&stored, 65_536, Some(2), bound).unwrap();
        assert_eq!(arrived.digest, digest(&stored));
        let err = arrived.index.unwrap_err().to_string();
        assert!(err.contains("declares 20000 entries"), "{err}");
    }
}
