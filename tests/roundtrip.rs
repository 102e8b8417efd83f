//! save → restore round trips through the real binary on the local store, and
//! the archive read by an independent zip reader.

mod common;

use std::fs;
use std::io::Read;

use common::cli::{local_blobs, Sandbox};
use common::tree::{assert_same_tree, feature_tree, small_files_tree};

#[test]
fn save_then_restore_reproduces_every_detail() {
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    feature_tree(&src, 1);
    let home_src = sb.home().join(".tool");
    small_files_tree(&home_src, 2, 300);
    let out = sb.ok(&["save", "--key", "k1", "cache", "~/.tool"]);
    assert!(out.contains("uploaded"), "{out}");

    let expected = sb.dir.path().join("expected");
    fs::create_dir(&expected).unwrap();
    fs::rename(&src, expected.join("cache")).unwrap();
    fs::rename(&home_src, expected.join("tool")).unwrap();
    let out = sb.ok(&["restore", "--key", "k1"]);
    assert!(out.contains("restored k1"), "{out}");
    assert_same_tree(&expected.join("cache"), &src);
    assert_same_tree(&expected.join("tool"), &home_src);
}

#[test]
fn restore_replaces_the_previous_directory_and_only_named_paths() {
    let sb = Sandbox::new();
    small_files_tree(&sb.work().join("a"), 3, 50);
    small_files_tree(&sb.work().join("b"), 4, 50);
    sb.ok(&["save", "--key", "two", "a", "b"]);
    let expected = sb.dir.path().join("expected-a");
    fs::rename(sb.work().join("a"), &expected).unwrap();
    // A stale directory with other content is replaced whole.
    fs::create_dir_all(sb.work().join("a/stale")).unwrap();
    fs::write(sb.work().join("b/untouched"), b"mine").unwrap();
    sb.ok(&["restore", "--key", "two", "a"]);
    assert_same_tree(&expected, &sb.work().join("a"));
    assert_eq!(fs::read(sb.work().join("b/untouched")).unwrap(), b"mine");
    // No temporary siblings are left behind.
    let leftovers: Vec<_> = fs::read_dir(sb.work())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.contains("cachemount").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn identical_content_is_uploaded_once() {
    let sb = Sandbox::new();
    small_files_tree(&sb.work().join("deps"), 5, 100);
    sb.ok(&["save", "--key", "first", "deps"]);
    let out = sb.ok(&["save", "--key", "second", "deps"]);
    assert!(out.contains("not uploaded"), "{out}");
    assert_eq!(local_blobs(&sb.dir.path().join("store")).len(), 1);
    let keys = sb.ok(&["keys"]);
    assert!(keys.contains("first") && keys.contains("second"), "{keys}");
}

#[test]
fn fallback_prefix_takes_the_newest_key() {
    let sb = Sandbox::new();
    fs::create_dir_all(sb.work().join("d")).unwrap();
    fs::write(sb.work().join("d/v"), b"old").unwrap();
    sb.ok(&["save", "--key", "node-aaa", "d"]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(sb.work().join("d/v"), b"new").unwrap();
    sb.ok(&["save", "--key", "node-bbb", "d"]);
    fs::remove_dir_all(sb.work().join("d")).unwrap();
    let out = sb.ok(&[
        "restore",
        "--key",
        "node-zzz",
        "--fallback",
        "other-",
        "--fallback",
        "node-",
    ]);
    assert!(out.contains("node-bbb (fallback for node-zzz)"), "{out}");
    assert_eq!(fs::read(sb.work().join("d/v")).unwrap(), b"new");
}

#[test]
fn independent_zip_reader_lists_and_decompresses_every_entry() {
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    feature_tree(&src, 7);
    sb.ok(&["save", "--key", "z", "cache"]);
    let blobs = local_blobs(&sb.dir.path().join("store"));
    let mut zip = zip::ZipArchive::new(fs::File::open(&blobs[0]).unwrap()).unwrap();
    let mut names = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut content = Vec::new();
        f.read_to_end(&mut content)
            .unwrap_or_else(|e| panic!("{name}: {e}")); // checks the CRC
        if f.is_file() && name.starts_with("_0/") && !f.is_symlink() {
            let on_disk = fs::read(src.join(name.strip_prefix("_0/cache/").unwrap())).unwrap();
            assert_eq!(content, on_disk, "{name}");
        }
        if name == "_0/cache/nested/rel-link" {
            assert!(f.is_symlink());
            assert_eq!(content, b"deeper/deepest/leaf.txt");
        }
        names.push(name);
    }
    assert_eq!(names[0], ".buildkite/cache-manifest.json");
    assert!(
        names.contains(&"_0/cache/empty-dir/".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"_0/cache/many-frames.bin".to_string()));
    let mut manifest = String::new();
    zip.by_name(".buildkite/cache-manifest.json")
        .unwrap()
        .read_to_string(&mut manifest)
        .unwrap();
    assert_eq!(manifest, r#"{"version":2,"mappings":{"_0":"."}}"#);
}

#[test]
fn restore_refreshes_an_old_blob_and_its_pointer_but_not_a_young_one() {
    let sb = Sandbox::new();
    small_files_tree(&sb.work().join("deps"), 6, 5);
    sb.ok(&["save", "--key", "old", "deps"]);
    let store = sb.dir.path().join("store");
    let blob = local_blobs(&store).remove(0);
    let pointer = store.join("keys/old");
    let mtime = |p: &std::path::Path| fs::metadata(p).unwrap().modified().unwrap();
    let young = mtime(&blob);
    sb.ok(&["restore", "--key", "old"]);
    assert_eq!(mtime(&blob), young, "a young blob is left alone");

    let two_days_ago = filetime::FileTime::from_unix_time(
        filetime::FileTime::now().unix_seconds() - 2 * 86_400,
        0,
    );
    filetime::set_file_mtime(&blob, two_days_ago).unwrap();
    filetime::set_file_mtime(&pointer, two_days_ago).unwrap();
    let before = mtime(&blob);
    sb.ok(&["restore", "--key", "old"]);
    assert!(
        mtime(&blob) > before + std::time::Duration::from_secs(86_400),
        "the blob's lifetime was refreshed"
    );
    assert!(
        mtime(&pointer) > before + std::time::Duration::from_secs(86_400),
        "the pointer's lifetime was refreshed"
    );
}

#[test]
fn sockets_and_fifos_are_skipped_with_a_warning() {
    let sb = Sandbox::new();
    let d = sb.work().join("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("kept"), b"x").unwrap();
    let fifo = std::ffi::CString::new(d.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let _listener = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
    let out = sb.run(&["save", "--key", "special", "d"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipped") && err.contains("pipe") && err.contains("sock"),
        "{err}"
    );
    fs::remove_dir_all(&d).unwrap();
    sb.ok(&["restore", "--key", "special"]);
    let names: Vec<_> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("kept")]);
}

#[test]
fn weird_names_and_deep_nesting_round_trip() {
    use std::os::unix::ffi::OsStrExt;
    let sb = Sandbox::new();
    let d = sb.work().join("weird");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("new\nline"), b"1").unwrap();
    fs::write(
        d.join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe")),
        b"2",
    )
    .unwrap();
    fs::write(d.join("x".repeat(255)), b"3").unwrap();
    fs::write(d.join("spaces and \\ back'slash\"quote"), b"4").unwrap();
    let mut deep = d.join("deep");
    for i in 0..200 {
        deep = deep.join(format!("{}", i % 10));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"5").unwrap();
    sb.ok(&["save", "--key", "weird", "weird"]);
    let expected = sb.dir.path().join("expected");
    fs::rename(&d, &expected).unwrap();
    sb.ok(&["restore", "--key", "weird"]);
    assert_same_tree(&expected, &d);
}
