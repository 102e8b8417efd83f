//! What a mount learns for the next one (DESIGN §8): at start, the access
//! profile of its key is loaded (off the start-up path) and replayed once
//! the mount answers (and handed on to the kernel's caches); at the end, the reads it recorded are merged into the
//! key's profile and written beside the key. Both are best effort: a
//! missing, damaged or oversized profile means no prefetch, and a profile
//! that cannot be written (read-only credentials) is one log line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::warm::Warmed;

use crate::cache::{Current, Fetcher};
use crate::profile::{self, Profile, Recorder};
use crate::store::ObjectStore;

/// The keys a key mount learns for: the one asked for (whose profile it
/// writes) and the one whose cache it mounted (a fallback's, or the same).
#[derive(Debug, Clone)]
pub struct LearnKeys {
    pub key: String,
    pub matched: String,
}

impl LearnKeys {
    /// Whose profile to read, in order: the key's own (the newest
    /// knowledge), then the one mounted.
    fn sources(&self) -> Vec<&str> {
        let mut keys = vec![self.key.as_str()];
        if self.matched != self.key {
            keys.push(&self.matched);
        }
        keys
    }
}

/// Starts loading the profile to replay (while the mount is set up).
pub fn load_profile<S: ObjectStore>(
    store: Arc<S>,
    keys: &LearnKeys,
) -> tokio::task::JoinHandle<Option<Profile>> {
    let keys = keys.clone();
    tokio::spawn(async move {
        let (from, p) = profile::load_first(&*store, &keys.sources()).await?;
        tracing::info!(
            "access profile of key {from:?}: {} entries from {} builds",
            p.entries.len(),
            p.builds
        );
        Some(p)
    })
}

/// Replays the profile `loading` yields, in the background, and hands what
/// it fetches on to the kernel of `mounts` ([`super::warm`]). Without a
/// profile, the mounts are told that nothing will be handed over.
pub fn spawn_replay<S: ObjectStore>(
    fetcher: Arc<Fetcher<S>>,
    current: Arc<Current>,
    loading: tokio::task::JoinHandle<Option<Profile>>,
    mounts: Vec<Warmed<S>>,
) {
    tokio::spawn(async move {
        let Ok(Some(profile)) = loading.await else {
            for m in &mounts {
                m.core.handed_all();
            }
            return;
        };
        let profile = Arc::new(profile);
        let replaying = Arc::new(AtomicBool::new(true));
        super::warm::spawn(mounts, profile.clone(), replaying.clone());
        let started = std::time::Instant::now();
        let done = fetcher.replay(&current, &profile).await;
        replaying.store(false, Ordering::Release);
        tracing::info!(
            "replayed the access profile: {} entries ({} skipped: not in this archive or not fetchable; {} already in the disk cache), {} blocks fetched in {} ms{}",
            done.entries,
            done.skipped,
            done.on_disk,
            done.pieces,
            started.elapsed().as_millis(),
            done.stopped.map(|why| format!("; stopped early: {why}")).unwrap_or_default()
        );
    });
}

/// Merges what `recorder` saw into the key's profile and writes it. A mount
/// nobody read from writes nothing (it would only age every entry).
pub async fn write_profile<S: ObjectStore>(store: &S, keys: &LearnKeys, recorder: &Recorder) {
    let reads = recorder.reads();
    if reads.is_empty() {
        return;
    }
    let old = profile::load_first(store, &keys.sources())
        .await
        .map(|(_, p)| p);
    let merged = profile::merge(old.as_ref(), &reads);
    match profile::store(store, &keys.key, &merged).await {
        Ok(()) => tracing::info!(
            "wrote the access profile of key {:?}: {} entries ({} read by this build), {} builds",
            keys.key,
            merged.entries.len(),
            reads.len(),
            merged.builds
        ),
        Err(e) => tracing::warn!(
            "cannot write the access profile of key {:?} ({e}); the next mount will not prefetch what this one read",
            keys.key
        ),
    }
}
