//! Files handed to the kernel's page cache, without a kernel: a recording
//! stands in for the FUSE notifier. What replay fetched is pushed in whole
//! pages (to the end of the file), nothing is fetched for it, a file the
//! build read already is not pushed again, the first open of a handed file
//! records the read and counts the replay's hits, and opens stay answered
//! until it is known that none are needed.

mod common;

use std::fs;
use std::sync::Arc;

use cachemount::cache::version::{open_version, Refresh};
use cachemount::cache::{Current, FetchConfig, Fetcher, Stats};
use cachemount::fs::{FsCore, HandOver, Invalidations, KernelCache, Tree};
use cachemount::profile::{Profile, ProfileEntry, Recorder};
use cachemount::store::local::LocalStore;
use common::tree::Rng;
use parking_lot::Mutex;

/// What the "kernel" was given: (inode, offset, bytes).
#[derive(Default)]
struct Pages(Mutex<Vec<(u64, u64, Vec<u8>)>>);

impl KernelCache for Pages {
    fn invalidate(&self, _: Invalidations) {}
    fn store(&self, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.lock().push((ino, offset, data.to_vec()));
        Ok(())
    }
}

struct Fixture {
    saved: common::local::Fixture,
    core: Arc<FsCore<LocalStore>>,
    fetcher: Arc<Fetcher<LocalStore>>,
    current: Arc<Current>,
    stats: Arc<Stats>,
    recorder: Arc<Recorder>,
    pages: Arc<Pages>,
}

/// `cache/`: a small file and a 3 MiB one (three frames), saved and mounted
/// as a core (recording) over a local store.
async fn fixture() -> Fixture {
    let saved = common::local::fixture(|src| {
        let mut rng = Rng::new(7);
        fs::create_dir_all(src.join("lib")).unwrap();
        fs::write(src.join("lib/a.js"), rng.text(3000)).unwrap();
        fs::write(src.join("big.bin"), rng.text(3 << 20)).unwrap();
    })
    .await;
    let stats = Arc::new(Stats::default());
    let fetcher = Fetcher::new(
        saved.store.clone(),
        64 << 20,
        stats.clone(),
        FetchConfig::default(),
    );
    let version = open_version(
        &*saved.store,
        &saved.blob,
        None,
        None,
        Refresh::Never,
        Some(&stats),
    )
    .await
    .unwrap();
    let tree = Tree::build(&version.index, b"_0/cache").unwrap();
    let current = Current::new(version);
    let core = Arc::new(FsCore::new(tree, current.clone(), fetcher.clone()).at_root(b"_0/cache"));
    let recorder = Arc::new(Recorder::default());
    core.set_recorder(recorder.clone());
    let pages = Arc::new(Pages::default());
    core.set_kernel(pages.clone());
    Fixture {
        saved,
        core,
        fetcher,
        current,
        stats,
        recorder,
        pages,
    }
}

fn entry(name: &str, start: u32, end: u32) -> ProfileEntry {
    ProfileEntry {
        name: format!("_0/cache/{name}").into_bytes().into(),
        seen: 1,
        start,
        end,
    }
}

fn ino(fx: &Fixture, path: &str) -> u64 {
    fx.core.mapped().tree.resolve(path.as_bytes()).unwrap()
}

fn counter(s: &Stats, c: fn(&Stats) -> &std::sync::atomic::AtomicU64) -> u64 {
    c(s).load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn replayed_files_go_to_the_kernel_in_whole_pages_and_their_first_open_records_the_read() {
    let fx = fixture().await;
    let small = "_0/cache/lib/a.js".as_bytes();
    assert_eq!(
        fx.core.hand_to_kernel(small, |s| 0..s).unwrap(),
        HandOver::NotCached,
        "nothing is fetched to hand over"
    );
    // Replay: the small file whole, the big one from 1.5 MiB to 2 MiB + 1 granule.
    let profile = Profile {
        builds: 1,
        entries: vec![entry("lib/a.js", 0, 1), entry("big.bin", 24, 33)],
    };
    let requests = counter(&fx.stats, |s| &s.requests);
    fx.fetcher.replay(&fx.current, &profile).await;
    assert!(counter(&fx.stats, |s| &s.requests) > requests);
    let requests = counter(&fx.stats, |s| &s.requests);

    fx.core.await_profile();
    assert!(
        fx.core.sees_opens(),
        "opens are answered while a profile may come"
    );
    fx.core.handing_over();
    for pe in &profile.entries {
        let got = fx.core.hand_to_kernel(&pe.name, |s| pe.bytes(s)).unwrap();
        assert!(matches!(got, HandOver::Done(_)), "{got:?}");
    }
    assert_eq!(counter(&fx.stats, |s| &s.requests), requests, "no GET");
    let a = fs::read(fx.saved.src.join("lib/a.js")).unwrap();
    let big = fs::read(fx.saved.src.join("big.bin")).unwrap();
    let stored = fx.pages.0.lock().clone();
    let (a_ino, big_ino) = (ino(&fx, "lib/a.js"), ino(&fx, "big.bin"));
    // The small file to its end (a partial last page is the file's end);
    // the big one from its range's page to the page after it.
    assert_eq!(stored[0], (a_ino, 0, a.clone()));
    let big_pushed: Vec<u8> = stored[1..]
        .iter()
        .inspect(|(i, ..)| assert_eq!(*i, big_ino))
        .flat_map(|(_, _, d)| d.clone())
        .collect();
    let (start, end) = (24 * 65536, 33 * 65536);
    assert_eq!(stored[1].1, start as u64);
    assert_eq!(big_pushed, big[start..end]);
    assert!(stored.iter().all(|(_, off, _)| off % 4096 == 0));
    assert_eq!(counter(&fx.stats, |s| &s.kernel_files), 2);
    assert_eq!(
        counter(&fx.stats, |s| &s.kernel_bytes),
        (a.len() + end - start) as u64
    );
    assert_eq!(
        counter(&fx.stats, |s| &s.replay_hits),
        0,
        "handing over is not a read"
    );
    assert!(fx.recorder.is_empty());

    // The build opens the small file: recorded, the replay's hit counted.
    fx.core.open(a_ino, false).unwrap();
    let reads = fx.recorder.reads();
    assert_eq!(reads.len(), 1);
    assert_eq!((reads[0].start, reads[0].end), (0, a.len() as u64));
    assert_eq!(counter(&fx.stats, |s| &s.replay_hits), 1);
    // A second open is not a second read.
    fx.core.open(a_ino, false).unwrap();
    assert_eq!(counter(&fx.stats, |s| &s.replay_hits), 1);

    // Once nothing more is handed over, opens are turned off when every
    // handed file has been opened: not before.
    fx.core.handed_all();
    assert!(fx.core.sees_opens(), "big.bin is still unopened");
    fx.core.open(big_ino, false).unwrap();
    assert_eq!(fx.recorder.reads()[1].start, start as u64);
    assert!(!fx.core.sees_opens());
}

#[tokio::test]
async fn only_files_of_the_mountpoint_the_build_has_not_read_are_handed_over() {
    let fx = fixture().await;
    let a_ino = ino(&fx, "lib/a.js");
    fx.core.read(a_ino, 0, 4096).await.unwrap();
    let skipped = [
        "_0/cache/lib/a.js", // read already: the kernel has it
        "_0/cache/lib",      // a directory
        "_0/cache/nothing.js",
        "_0/other/lib/a.js", // another mountpoint's
        "_0/cache/lib/a.js/x",
    ];
    for name in skipped {
        assert_eq!(
            fx.core.hand_to_kernel(name.as_bytes(), |s| 0..s).unwrap(),
            HandOver::Skipped,
            "{name}"
        );
    }
    assert!(fx.pages.0.lock().is_empty());
    // Only the tree's own directories are listed to warm the kernel: a
    // profile's names are untrusted.
    assert_eq!(fx.core.dir_of(b"_0/cache/lib/a.js"), Some(&b"lib"[..]));
    assert_eq!(fx.core.dir_of(b"_0/cache/a.js"), Some(&b""[..]));
    for name in [
        "_0/cache/../../etc/passwd",
        "_0/cache/lib/../x",
        "_0/cache/no/x.js",
        "/etc/x",
    ] {
        assert_eq!(fx.core.dir_of(name.as_bytes()), None, "{name}");
    }
    assert!(!fx.core.sees_opens(), "no profile: opens are turned off");
}
