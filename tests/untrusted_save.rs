//! `save` and the store against hostile or impossible input (issue 10, items 6
//! and 7), with the real binary: keys a store cannot hold are refused before
//! anything is uploaded (local store and SeaweedFS), a killed writer's temp
//! files in the local store are swept by the next save, and a file swapped
//! for a symlink between the walk and the read is not archived.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use cachemount::store::ObjectStore;
use common::cli::{local_blobs, Sandbox};
use common::s3::TestS3;
use common::tree::Rng;

/// Every file under `dir` (recursively), as paths relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

/// `save --key KEY cache` fails with a message containing every one of `wanted`.
fn save_refused(sb: &Sandbox, key: &str, wanted: &[&str]) {
    let (code, stderr) = sb.fails(&["save", "--key", key, "cache"]);
    assert_eq!(code, 1, "{stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "expected {w:?} in: {stderr}");
    }
}

#[test]
fn keys_the_local_store_cannot_hold_are_refused_before_upload() {
    let mut sb = Sandbox::new();
    fs::create_dir_all(sb.work().join("cache")).unwrap();
    fs::write(sb.work().join("cache/f"), b"content").unwrap();

    save_refused(&sb, "", &["the cache key is empty"]);
    save_refused(&sb, &"k".repeat(513), &["513 bytes long", "at most 512"]);
    // A store deep enough that a 300-byte key's pointer is over PATH_MAX.
    let deep = sb
        .dir
        .path()
        .join("d".repeat(200) + "/")
        .join("e".repeat(200));
    let deep = (0..14).fold(deep, |p, i| p.join(format!("{i}").repeat(200)));
    let root_store = std::mem::replace(&mut sb.store, deep.display().to_string());
    save_refused(
        &sb,
        &"/".repeat(300),
        &["(300 bytes)", "over a local path's limit of 4095 bytes"],
    );
    assert!(files_under(&deep).is_empty(), "{:?}", files_under(&deep));
    sb.store = root_store;
    let store = Path::new(&sb.store);
    assert!(files_under(store).is_empty(), "{:?}", files_under(store));

    // On a normal root a 300-byte key fits: its escaped name is cut into
    // path segments well under a file name's 255 bytes.
    let fits = "/".repeat(300);
    sb.ok(&["save", "--key", &fits, "cache"]);
    assert_eq!(local_blobs(store).len(), 1);
    let longest = files_under(&store.join("keys"))
        .iter()
        .flat_map(|p| p.iter().map(|c| c.len()).collect::<Vec<_>>())
        .max()
        .unwrap();
    assert!(longest <= 255, "{longest}");
}

#[test]
fn keys_s3_cannot_hold_are_refused_before_upload() {
    let Some(s3) = TestS3::from_env("keys_s3_cannot_hold_are_refused_before_upload") else {
        return;
    };
    let mut sb = Sandbox::new();
    sb.store = s3.url().to_string();
    sb.env
        .push(("AWS_ENDPOINT_URL".into(), s3.endpoint.clone()));
    fs::create_dir_all(sb.work().join("cache")).unwrap();
    fs::write(sb.work().join("cache/f"), b"content").unwrap();

    save_refused(&sb, &"k".repeat(1100), &["1100 bytes long", "at most 512"]);
    // 400 bytes, but each '/' is escaped as three: over S3's 1,024 bytes.
    save_refused(
        &sb,
        &"/".repeat(400),
        &["(400 bytes)", "over S3's object key limit of 1024 bytes"],
    );
    let (code, stderr) = sb.fails(&["restore", "--key", "absent", "--fallback", &"/".repeat(400)]);
    assert_eq!(
        code, 1,
        "not a cache miss: the prefix can never match; {stderr}"
    );
    assert!(
        stderr.contains("key prefix (400 bytes)") && stderr.contains("1024 bytes"),
        "{stderr}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(s3.store());
    let listed = rt.block_on(store.list("")).unwrap();
    assert!(listed.is_empty(), "nothing may be uploaded: {listed:?}");
    sb.ok(&["save", "--key", &"k".repeat(300), "cache"]);
    let blobs = rt.block_on(store.list("blobs/")).unwrap();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
}

#[test]
fn a_killed_writers_temp_files_are_swept_by_the_next_save() {
    let sb = Sandbox::new();
    fs::create_dir_all(sb.work().join("cache")).unwrap();
    fs::write(sb.work().join("cache/f"), b"one").unwrap();
    sb.ok(&["save", "--key", "first", "cache"]);
    let store = Path::new(&sb.store);
    let two_hours_ago =
        filetime::FileTime::from_system_time(SystemTime::now() - Duration::from_secs(7200));
    let mut stale = Vec::new();
    for dir in ["blobs/sha256", "keys"] {
        let p = store.join(dir).join(".cachemount-tmp-4242-0-1f");
        fs::write(&p, vec![0u8; 4096]).unwrap();
        filetime::set_file_mtime(&p, two_hours_ago).unwrap();
        stale.push(p);
    }
    // A write in progress elsewhere (fresh): it must survive.
    let live = store.join("keys/.cachemount-tmp-4343-0-2f");
    fs::write(&live, b"partial").unwrap();

    fs::write(sb.work().join("cache/f"), b"two").unwrap();
    sb.ok(&["save", "--key", "second", "cache"]);
    for p in &stale {
        assert!(!p.exists(), "{} was not swept", p.display());
    }
    assert!(live.exists(), "a fresh temp file was removed");
    let keys = sb.ok(&["keys"]);
    assert!(keys.contains("first") && keys.contains("second"), "{keys}");
}

#[test]
fn a_file_swapped_for_a_symlink_after_the_walk_is_not_archived() {
    let sb = Sandbox::new();
    let cache = sb.work().join("cache");
    fs::create_dir_all(&cache).unwrap();
    // Read first (names sort), and long enough to compress that the swap
    // below lands before `victim` is read.
    fs::write(cache.join("big"), Rng::new(3).noise(96 << 20)).unwrap();
    fs::write(cache.join("victim"), b"harmless").unwrap();
    let secret = sb.dir.path().join("secret");
    fs::write(&secret, b"SECRET!!").unwrap();

    let mut child = sb
        .command(&["-v", "save", "--key", "k", "cache"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("listed the paths") {
            fs::remove_file(cache.join("victim")).unwrap();
            std::os::unix::fs::symlink(&secret, cache.join("victim")).unwrap();
            break;
        }
        line.clear();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("save did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::io::Read::read_to_string(&mut stderr, &mut seen).unwrap();
    assert!(!status.success(), "save archived a swapped file: {seen}");
    assert!(
        seen.contains(&format!(
            "{} changed while being saved: it is now a symlink",
            cache.join("victim").display()
        )),
        "{seen}"
    );
    let store = Path::new(&sb.store);
    assert!(local_blobs(store).is_empty() && !store.join("keys/k").exists());
}
