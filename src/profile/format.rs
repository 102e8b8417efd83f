//! The access profile's bytes in the store (`profiles/<escaped key>`): a
//! versioned, checksummed binary list of archive names in access order, each
//! with the coarse byte range builds read and which of the last builds read
//! it. A profile is untrusted input (a pull-request build may have written
//! it): [`Profile::parse`] bounds the length, the count and every name before
//! it allocates, and any damage is an error, never a panic.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic    "cachemount-profile\n"   19 bytes
//! version  u32                      FORMAT_VERSION
//! builds   u32                      builds merged into it (saturating)
//! count    u32                      entries that follow
//! entry    name_len u16, name [name_len], seen u8, start u32, end u32
//! crc      u32                      CRC-32 of everything before it
//! ```
//!
//! `start..end` is in [`GRANULE`] units (start rounded down, end up): the
//! profile says which part of a file was read, not every read. `seen` has bit
//! 0 set when the newest build read the entry, bit 1 for the build before…

/// First bytes of every profile.
pub const MAGIC: &[u8] = b"cachemount-profile\n";
/// The layout written; another version is refused (and ignored by a mount).
pub const FORMAT_VERSION: u32 = 1;
/// Byte ranges are recorded in units of this many bytes.
pub const GRANULE: u64 = 64 << 10;
/// A profile object longer than this is refused unread.
pub const MAX_PROFILE_LEN: u64 = 64 << 20;
/// Most entries in one profile (recording stops adding past it).
pub const MAX_ENTRIES: usize = 1 << 20;
/// The longest name (an archive name is a path: PATH_MAX).
pub const MAX_NAME_LEN: usize = 4096;
/// Bytes of an entry besides its name.
const ENTRY_FIXED: usize = 2 + 1 + 4 + 4;
const HEADER_LEN: usize = MAGIC.len() + 12;

/// One archive entry builds read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileEntry {
    /// The archive name (`_0/node_modules/x/index.js`).
    pub name: Box<[u8]>,
    /// Which of the last builds read it: bit 0 the newest.
    pub seen: u8,
    /// The part read, in [`GRANULE`]s: `start..end`.
    pub start: u32,
    pub end: u32,
}

impl ProfileEntry {
    /// The byte range read, clamped to `size` (the entry's size now).
    pub fn bytes(&self, size: u64) -> std::ops::Range<u64> {
        let start = (u64::from(self.start) * GRANULE).min(size);
        let end = (u64::from(self.end) * GRANULE).min(size);
        start..end.max(start)
    }
}

/// Granules covering the bytes `start..end`.
pub fn granules(start: u64, end: u64) -> (u32, u32) {
    let g = |x: u64| x.min(u64::from(u32::MAX)) as u32;
    (g(start / GRANULE), g(end.div_ceil(GRANULE)))
}

/// A key's access profile: the entries recent builds read, in the order the
/// newest build first read them (then older builds' entries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// Builds merged into this profile.
    pub builds: u32,
    pub entries: Vec<ProfileEntry>,
}

/// Why a profile's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0} bytes long, more than a profile may be ({MAX_PROFILE_LEN})")]
    TooLong(u64),
    #[error("not a cachemount profile (bad magic)")]
    Magic,
    #[error("profile format version {0}, this cachemount reads {FORMAT_VERSION}")]
    Version(u32),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("declares {0} entries, more than it can hold or than {MAX_ENTRIES}")]
    Count(u32),
    #[error("entry {0}: name of {1} bytes (empty or over {MAX_NAME_LEN})")]
    Name(usize, usize),
    #[error("entry {0}: range ends before it starts")]
    Range(usize),
    #[error("checksum does not match")]
    Checksum,
    #[error("{0} bytes after the last entry")]
    Trailing(usize),
}

impl Profile {
    /// The profile's bytes (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let names: usize = self.entries.iter().map(|e| e.name.len()).sum();
        let mut out = Vec::with_capacity(HEADER_LEN + names + ENTRY_FIXED * self.entries.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.builds.to_le_bytes());
        let entries = &self.entries[..self.entries.len().min(MAX_ENTRIES)];
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            let name = &e.name[..e.name.len().min(MAX_NAME_LEN)];
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name);
            out.push(e.seen);
            out.extend_from_slice(&e.start.to_le_bytes());
            out.extend_from_slice(&e.end.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a profile's bytes, bounded whatever they declare. A name that
    /// occurs twice keeps its first place.
    pub fn parse(bytes: &[u8]) -> Result<Profile, FormatError> {
        if bytes.len() as u64 > MAX_PROFILE_LEN {
            return Err(FormatError::TooLong(bytes.len() as u64));
        }
        if bytes.len() < HEADER_LEN + 4 {
            return Err(if bytes.starts_with(MAGIC) || MAGIC.starts_with(bytes) {
                FormatError::Truncated(bytes.len())
            } else {
                FormatError::Magic
            });
        }
        if !bytes.starts_with(MAGIC) {
            return Err(FormatError::Magic);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut r = Reader {
            bytes: body,
            at: MAGIC.len(),
        };
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(FormatError::Checksum);
        }
        let builds = r.u32()?;
        let count = r.u32()?;
        // Every entry takes at least ENTRY_FIXED + 1 bytes: bound before allocating.
        let room = (body.len() - r.at) / (ENTRY_FIXED + 1);
        if count as usize > room.min(MAX_ENTRIES) {
            return Err(FormatError::Count(count));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut seen_names = std::collections::HashSet::with_capacity(count as usize);
        for i in 0..count as usize {
            let len = usize::from(r.u16()?);
            if len == 0 || len > MAX_NAME_LEN {
                return Err(FormatError::Name(i, len));
            }
            let name = r.take(len)?;
            let seen = r.take(1)?[0];
            let (start, end) = (r.u32()?, r.u32()?);
            if end < start {
                return Err(FormatError::Range(i));
            }
            if seen_names.insert(name) {
                entries.push(ProfileEntry {
                    name: name.into(),
                    seen,
                    start,
                    end,
                });
            }
        }
        if r.at != body.len() {
            return Err(FormatError::Trailing(body.len() - r.at));
        }
        Ok(Profile { builds, entries })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let out = self
            .bytes
            .get(self.at..self.at.saturating_add(n))
            .ok_or(FormatError::Truncated(self.at))?;
        self.at += n;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, seen: u8, start: u32, end: u32) -> ProfileEntry {
        ProfileEntry {
            name: name.as_bytes().into(),
            seen,
            start,
            end,
        }
    }

    fn sample() -> Profile {
        Profile {
            builds: 3,
            entries: vec![
                entry("_0/b/index.js", 1, 0, 1),
                entry("_0/a/big.bin", 0b101, 2, 40),
                entry("_1/x", 0x80, 0, 0),
            ],
        }
    }

    #[test]
    fn a_profile_round_trips() {
        let p = sample();
        assert_eq!(Profile::parse(&p.encode()).unwrap(), p);
        let empty = Profile::default();
        assert_eq!(Profile::parse(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let good = sample().encode();
        for cut in 0..good.len() {
            assert!(Profile::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(Profile::parse(&bad).is_err(), "flip at {i}");
        }
        assert_eq!(Profile::parse(b"{\"json\": 1}"), Err(FormatError::Magic));
    }

    #[test]
    fn declared_counts_are_bounded_before_allocating() {
        let mut p = sample().encode();
        let at = MAGIC.len() + 8;
        p[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let body = p.len() - 4;
        let crc = crc32fast::hash(&p[..body]);
        p[body..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Profile::parse(&p), Err(FormatError::Count(u32::MAX)));
        let huge = vec![0u8; MAX_PROFILE_LEN as usize + 1];
        assert!(matches!(
            Profile::parse(&huge),
            Err(FormatError::TooLong(_))
        ));
    }

    #[test]
    fn a_repeated_name_keeps_its_first_place() {
        let mut p = sample();
        p.entries.push(entry("_0/b/index.js", 2, 5, 6));
        let parsed = Profile::parse(&p.encode()).unwrap();
        assert_eq!(parsed.entries, sample().entries);
    }

    #[test]
    fn ranges_are_granules_clamped_to_the_size() {
        assert_eq!(granules(0, 1), (0, 1));
        assert_eq!(granules(GRANULE + 1, 3 * GRANULE), (1, 3));
        let e = entry("f", 1, 1, 3);
        assert_eq!(e.bytes(100 << 20), GRANULE..3 * GRANULE);
        assert_eq!(e.bytes(GRANULE + 10), GRANULE..GRANULE + 10);
        assert_eq!(e.bytes(5), 5..5);
    }
}
