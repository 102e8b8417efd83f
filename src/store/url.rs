//! Store URLs: what `--store` and a raw object URL given to `mount` mean.
//!
//! Accepted forms: `file:///abs/dir`, a bare absolute or relative path (both a
//! local directory store), and `s3://bucket/prefix` (the prefix may be empty).
//! With no `--store` the default is a local directory under the user's cache
//! dir, so nothing has to be running for cachemount to work.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A directory on local disk (always absolute once parsed).
    Local { root: PathBuf },
    /// An S3 bucket; `prefix` has no leading or trailing `/` and may be empty.
    S3 { bucket: String, prefix: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("unsupported store URL {0:?}: use s3://bucket/prefix, file:///absolute/dir, or a directory path")]
    UnknownScheme(String),
    #[error("invalid store URL {url:?}: {reason}")]
    Invalid { url: String, reason: &'static str },
    #[error("{0:?} names no object: an object URL must end with the object's name (s3://bucket/dir/archive.zip, file:///dir/archive.zip)")]
    NoObjectName(String),
    #[error("cannot determine the user's cache directory for the default store; pass --store")]
    NoCacheDir,
    #[error("cannot resolve the current directory for {path:?}: {message}")]
    CurrentDir { path: String, message: String },
}

impl StoreUrl {
    /// Parses a `--store` value.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let invalid = |reason| UrlError::Invalid {
            url: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("no bucket name after s3://"));
            }
            if bucket
                .chars()
                .any(|c| c.is_whitespace() || c == '?' || c == '#')
            {
                return Err(invalid(
                    "the bucket name contains characters S3 does not allow",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|c| c.is_empty()) && !prefix.is_empty() {
                return Err(invalid(
                    "the prefix contains an empty path component (`//`)",
                ));
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(invalid(
                    "a file URL needs an absolute path and no host: file:///abs/dir",
                ));
            }
            return Ok(StoreUrl::Local {
                root: PathBuf::from(rest),
            });
        }
        if s.contains("://") || s.starts_with("s3:") || s.starts_with("file:") {
            return Err(UrlError::UnknownScheme(s.to_string()));
        }
        Ok(StoreUrl::Local { root: absolute(s)? })
    }

    /// The embedded default: `<user cache dir>/cachemount/store`.
    pub fn default_local() -> Result<Self, UrlError> {
        let cache = dirs::cache_dir().ok_or(UrlError::NoCacheDir)?;
        Ok(StoreUrl::Local {
            root: cache.join("cachemount").join("store"),
        })
    }
}

impl FromStr for StoreUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StoreUrl::parse(s)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Local { root } => write!(f, "file://{}", root.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Splits a raw object URL (`s3://bucket/dir/archive.zip`, `file:///dir/archive.zip`,
/// or a path) into the store holding its parent and the object's key in that store.
/// This is how `mount URL` reads an archive that has no key pointer.
pub fn split_object_url(s: &str) -> Result<(StoreUrl, String), UrlError> {
    let no_name = || UrlError::NoObjectName(s.to_string());
    if s.ends_with('/') {
        return Err(no_name());
    }
    match StoreUrl::parse(s)? {
        StoreUrl::S3 { bucket, prefix } => {
            let (parent, name) = match prefix.rsplit_once('/') {
                Some((parent, name)) => (parent.to_string(), name.to_string()),
                None => (String::new(), prefix),
            };
            if name.is_empty() {
                return Err(no_name());
            }
            Ok((
                StoreUrl::S3 {
                    bucket,
                    prefix: parent,
                },
                name,
            ))
        }
        StoreUrl::Local { root } => {
            let name = root
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(no_name)?
                .to_string();
            let parent = root.parent().ok_or_else(no_name)?.to_path_buf();
            Ok((StoreUrl::Local { root: parent }, name))
        }
    }
}

fn absolute(path: &str) -> Result<PathBuf, UrlError> {
    std::path::absolute(Path::new(path)).map_err(|e| UrlError::CurrentDir {
        path: path.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, prefix: &str) -> StoreUrl {
        StoreUrl::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn parses_s3_with_and_without_prefix() {
        assert_eq!(StoreUrl::parse("s3://b").unwrap(), s3("b", ""));
        assert_eq!(StoreUrl::parse("s3://b/").unwrap(), s3("b", ""));
        assert_eq!(
            StoreUrl::parse("s3://b/ci-cache/").unwrap(),
            s3("b", "ci-cache")
        );
        assert_eq!(StoreUrl::parse("s3://b/a/b").unwrap(), s3("b", "a/b"));
        assert!(StoreUrl::parse("s3:///x").is_err());
        assert!(StoreUrl::parse("s3://b/a//b").is_err());
    }

    #[test]
    fn parses_local_forms() {
        let abs = StoreUrl::Local {
            root: "/var/cache/x".into(),
        };
        assert_eq!(StoreUrl::parse("file:///var/cache/x").unwrap(), abs);
        assert_eq!(StoreUrl::parse("/var/cache/x").unwrap(), abs);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            StoreUrl::parse("rel/dir").unwrap(),
            StoreUrl::Local {
                root: cwd.join("rel/dir")
            }
        );
        assert!(matches!(
            StoreUrl::parse("file://host/x"),
            Err(UrlError::Invalid { .. })
        ));
    }

    #[test]
    fn unknown_scheme_names_accepted_forms() {
        let err = StoreUrl::parse("gs://bucket/x").unwrap_err();
        assert!(matches!(err, UrlError::UnknownScheme(_)));
        let msg = err.to_string();
        assert!(msg.contains("s3://") && msg.contains("file://"), "{msg}");
    }

    #[test]
    fn display_round_trips() {
        for url in ["s3://b", "s3://b/p/q", "file:///tmp/store"] {
            assert_eq!(StoreUrl::parse(url).unwrap().to_string(), url);
        }
    }

    #[test]
    fn splits_object_urls() {
        assert_eq!(
            split_object_url("s3://b/dir/sub/a.zip").unwrap(),
            (s3("b", "dir/sub"), "a.zip".into())
        );
        assert_eq!(
            split_object_url("s3://b/a.zip").unwrap(),
            (s3("b", ""), "a.zip".into())
        );
        assert_eq!(
            split_object_url("file:///x/y.zip").unwrap(),
            (StoreUrl::Local { root: "/x".into() }, "y.zip".into())
        );
        assert!(matches!(
            split_object_url("s3://b"),
            Err(UrlError::NoObjectName(_))
        ));
        assert!(matches!(
            split_object_url("s3://b/dir/"),
            Err(UrlError::NoObjectName(_))
        ));
        assert!(matches!(
            split_object_url("file:///"),
            Err(UrlError::NoObjectName(_))
        ));
    }

    #[test]
    fn default_store_is_under_the_cache_dir() {
        if let Some(cache) = dirs::cache_dir() {
            let StoreUrl::Local { root } = StoreUrl::default_local().unwrap() else {
                panic!("not local")
            };
            assert_eq!(root, cache.join("cachemount/store"));
        }
    }
}
