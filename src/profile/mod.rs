//! Access profiles (DESIGN §8): what builds read of a cache, learned from
//! the builds themselves. A mount records its reads ([`record`]); when it
//! ends, they are merged into the key's profile ([`merge`]) and written to
//! `PREFIX/profiles/<escaped key>` ([`format`]); the next mount prefetches
//! the profile's entries (`cache::replay`), the next `save` lays them out
//! first, and `report` says what builds never read ([`usage`]).
//!
//! A profile is untrusted input and a hint only: reading one that is
//! missing, oversized or damaged gives an error the caller logs and goes on
//! without; writing one is best effort.

pub mod format;
pub mod merge;
pub mod record;
pub mod usage;

pub use format::{Profile, ProfileEntry};
pub use merge::merge;
pub use record::{Read, Recorder};

use crate::store::layout::{self, KeyError};
use crate::store::{ObjectStore, PutSource, StoreError};

/// Why a key's profile could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the access profile {object} is unusable: {error}")]
    Format {
        object: String,
        error: format::FormatError,
    },
}

/// A profile up to this long is read in one request, which also tells its
/// size; a longer one takes a second, and one over
/// [`format::MAX_PROFILE_LEN`] is refused having read no more than this.
const FIRST_READ: u64 = 1 << 20;

/// The profile of `key`, `None` when it has none.
pub async fn load<S: ObjectStore>(store: &S, key: &str) -> Result<Option<Profile>, ProfileError> {
    let object = layout::profile_key(store, key)?;
    // Missing, or replaced or removed while being read: another build's
    // profile; skip it.
    let gone = |e: StoreError| match e {
        StoreError::NotFound(_) | StoreError::PreconditionFailed(_) => Ok(None),
        e => Err(ProfileError::from(e)),
    };
    let (meta, last) = match store.get_tail(&object, FIRST_READ).await {
        Ok(got) => got,
        Err(e) => return gone(e),
    };
    let bad = |error| ProfileError::Format {
        object: object.clone(),
        error,
    };
    if meta.size > format::MAX_PROFILE_LEN {
        return Err(bad(format::FormatError::TooLong(meta.size)));
    }
    let rest = meta.size - last.len() as u64;
    let bytes = if rest == 0 {
        last
    } else {
        match store.get_range(&object, 0..rest, Some(&meta.version)).await {
            Ok(first) => [first, last].concat().into(),
            Err(e) => return gone(e),
        }
    };
    Profile::parse(&bytes).map(Some).map_err(bad)
}

/// The first profile there is of `keys`, in order (a mount's or a save's
/// own key, then the key it was mounted from); unusable ones are logged and
/// passed over.
pub async fn load_first<S: ObjectStore>(store: &S, keys: &[&str]) -> Option<(String, Profile)> {
    for key in keys {
        match load(store, key).await {
            Ok(Some(p)) => return Some((key.to_string(), p)),
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring the access profile of key {key:?}: {e}"),
        }
    }
    None
}

/// Writes `profile` as the profile of `key` (atomically, last writer wins).
pub async fn store<S: ObjectStore>(
    store: &S,
    key: &str,
    profile: &Profile,
) -> Result<(), ProfileError> {
    let object = layout::profile_key(store, key)?;
    store
        .put(&object, PutSource::Bytes(profile.encode().into()))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;
    use sha2::{Digest, Sha256};

    /// A profile longer than the first read comes whole from two reads;
    /// a short one from one.
    #[tokio::test]
    async fn profiles_round_trip_through_a_store_short_and_long() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path().to_path_buf());
        let named = |n: usize| Profile {
            builds: 2,
            entries: (0..n)
                .map(|i| ProfileEntry {
                    // Names that do not compress, so the profile is long.
                    name: format!("_0/{}", hex::encode(Sha256::digest(i.to_le_bytes())))
                        .into_bytes()
                        .into(),
                    seen: 1,
                    start: 0,
                    end: 1,
                })
                .collect(),
        };
        for n in [3, 40_000] {
            let p = named(n);
            store(&s, "k", &p).await.unwrap();
            let long = p.encode().len() as u64 > FIRST_READ;
            assert_eq!(
                long,
                n > 3,
                "{n} entries encode to {} bytes",
                p.encode().len()
            );
            assert_eq!(load(&s, "k").await.unwrap(), Some(p));
        }
        assert_eq!(load(&s, "none").await.unwrap(), None);
    }
}
