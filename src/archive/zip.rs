//! Zip records: encoding the headers cachemount writes and decoding the ones
//! any zip writer produces (EOCD, zip64 EOCD + locator, central directory,
//! local headers, the extra fields that matter).
//!
//! Only record-level work lives here; which entries go where is the writer's
//! business and what they mean is the reader's. Every decoder is bounds-checked
//! and never trusts a length it has not checked against the buffer (these bytes
//! come from a store and are fuzzed).

use super::FormatError;

pub const LOCAL_HEADER_SIG: u32 = 0x0403_4b50;
pub const CENTRAL_HEADER_SIG: u32 = 0x0201_4b50;
pub const EOCD_SIG: u32 = 0x0605_4b50;
pub const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
pub const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;

pub const LOCAL_HEADER_LEN: usize = 30;
pub const CENTRAL_HEADER_LEN: usize = 46;
pub const EOCD_LEN: usize = 22;
pub const ZIP64_EOCD_LEN: usize = 56;
pub const ZIP64_LOCATOR_LEN: usize = 20;
/// The EOCD sits within the last 22 + 65535 (max comment) bytes.
pub const MAX_EOCD_SEARCH: usize = EOCD_LEN + u16::MAX as usize;

pub const METHOD_STORED: u16 = 0;
pub const METHOD_DEFLATE: u16 = 8;
pub const METHOD_ZSTD: u16 = 93;

const EXTRA_ZIP64: u16 = 0x0001;
const EXTRA_EXT_TIMESTAMP: u16 = 0x5455;
/// General purpose flag bit 11: the name is UTF-8.
pub const FLAG_UTF8: u16 = 1 << 11;
/// "Version made by" upper byte 3 = Unix: external attributes carry st_mode.
const MADE_BY_UNIX: u16 = 3 << 8;

const U32_MAX: u64 = u32::MAX as u64;

/// Little-endian cursor over a byte slice that fails instead of panicking.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(FormatError::Truncated("zip record"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

/// What the writer knows about one entry when it emits its headers.
#[derive(Debug, Clone)]
pub struct HeaderFields {
    pub name: Vec<u8>,
    pub method: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Offset of the local header in the archive.
    pub local_header_offset: u64,
    /// Full st_mode (type and permission bits).
    pub unix_mode: u32,
    pub mtime_secs: i64,
    /// Whether the local header reserves a zip64 extra (decided before the
    /// sizes are known, so the header can be patched in place).
    pub zip64_local: bool,
}

impl HeaderFields {
    fn version_needed(&self) -> u16 {
        match self.method {
            METHOD_ZSTD => 63,
            _ if self.zip64_local || self.needs_zip64_central() => 45,
            _ => 20,
        }
    }
    fn flags(&self) -> u16 {
        if std::str::from_utf8(&self.name).is_ok() {
            FLAG_UTF8
        } else {
            0
        }
    }
    fn needs_zip64_central(&self) -> bool {
        self.compressed_size >= U32_MAX
            || self.uncompressed_size >= U32_MAX
            || self.local_header_offset >= U32_MAX
    }
    fn timestamp_extra(&self) -> Vec<u8> {
        match u32::try_from(self.mtime_secs) {
            Ok(secs) => {
                let mut e = Vec::with_capacity(9);
                e.extend_from_slice(&EXTRA_EXT_TIMESTAMP.to_le_bytes());
                e.extend_from_slice(&5u16.to_le_bytes());
                e.push(1); // mtime present
                e.extend_from_slice(&secs.to_le_bytes());
                e
            }
            Err(_) => Vec::new(),
        }
    }

    /// The run of fields local and central headers share, from "version
    /// needed" to the extra field's length.
    fn put_shared_fields(&self, h: &mut Vec<u8>, csize: u32, usize_: u32, extra_len: usize) {
        let (time, date) = dos_datetime(self.mtime_secs);
        h.extend_from_slice(&self.version_needed().to_le_bytes());
        h.extend_from_slice(&self.flags().to_le_bytes());
        h.extend_from_slice(&self.method.to_le_bytes());
        h.extend_from_slice(&time.to_le_bytes());
        h.extend_from_slice(&date.to_le_bytes());
        h.extend_from_slice(&self.crc32.to_le_bytes());
        h.extend_from_slice(&csize.to_le_bytes());
        h.extend_from_slice(&usize_.to_le_bytes());
        h.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        h.extend_from_slice(&(extra_len as u16).to_le_bytes());
    }

    pub fn encode_local(&self) -> Vec<u8> {
        let mut extra = self.timestamp_extra();
        let (csize, usize_) = if self.zip64_local {
            extra.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&self.uncompressed_size.to_le_bytes());
            extra.extend_from_slice(&self.compressed_size.to_le_bytes());
            (u32::MAX, u32::MAX)
        } else {
            (self.compressed_size as u32, self.uncompressed_size as u32)
        };
        let mut h = Vec::with_capacity(LOCAL_HEADER_LEN + self.name.len() + extra.len());
        h.extend_from_slice(&LOCAL_HEADER_SIG.to_le_bytes());
        self.put_shared_fields(&mut h, csize, usize_, extra.len());
        h.extend_from_slice(&self.name);
        h.extend_from_slice(&extra);
        h
    }

    pub fn encode_central(&self) -> Vec<u8> {
        let mut extra = self.timestamp_extra();
        let mut zip64 = Vec::new();
        let usize_ = if self.uncompressed_size >= U32_MAX {
            zip64.extend_from_slice(&self.uncompressed_size.to_le_bytes());
            u32::MAX
        } else {
            self.uncompressed_size as u32
        };
        let csize = if self.compressed_size >= U32_MAX {
            zip64.extend_from_slice(&self.compressed_size.to_le_bytes());
            u32::MAX
        } else {
            self.compressed_size as u32
        };
        let offset = if self.local_header_offset >= U32_MAX {
            zip64.extend_from_slice(&self.local_header_offset.to_le_bytes());
            u32::MAX
        } else {
            self.local_header_offset as u32
        };
        if !zip64.is_empty() {
            extra.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
            extra.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
            extra.extend_from_slice(&zip64);
        }
        let dos_dir = if self.unix_mode & libc::S_IFMT == libc::S_IFDIR {
            0x10
        } else {
            0
        };
        let mut h = Vec::with_capacity(CENTRAL_HEADER_LEN + self.name.len() + extra.len());
        h.extend_from_slice(&CENTRAL_HEADER_SIG.to_le_bytes());
        h.extend_from_slice(&(MADE_BY_UNIX | 63).to_le_bytes());
        self.put_shared_fields(&mut h, csize, usize_, extra.len());
        h.extend_from_slice(&0u16.to_le_bytes()); // comment length
        h.extend_from_slice(&0u16.to_le_bytes()); // disk number
        h.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        h.extend_from_slice(&((self.unix_mode << 16) | dos_dir).to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        h.extend_from_slice(&self.name);
        h.extend_from_slice(&extra);
        h
    }
}

/// MS-DOS time and date (2-second resolution, 1980..2107), clamped; the real
/// mtime lives in the extended timestamp extra and in cachemount's index.
fn dos_datetime(secs: i64) -> (u16, u16) {
    const DOS_EPOCH: i64 = 315_532_800; // 1980-01-01T00:00:00Z
    let secs = secs.clamp(DOS_EPOCH, 4_354_819_198);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let time = (((rem / 3600) << 11) | (((rem % 3600) / 60) << 5) | ((rem % 60) / 2)) as u16;
    let date = (((y - 1980) << 9) | (m << 5) | d) as u16;
    (time, date)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Seconds since the epoch (UTC) of an MS-DOS date and time.
pub fn dos_to_unix(time: u16, date: u16) -> i64 {
    let y = 1980 + i64::from(date >> 9);
    let m = i64::from((date >> 5) & 0xf).clamp(1, 12);
    let d = i64::from(date & 0x1f).max(1);
    let secs = i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3f) * 60
        + i64::from(time & 0x1f) * 2;
    days_from_civil(y, m, d) * 86_400 + secs
}

/// The end of central directory, after zip64 values have replaced the 0xFFFF.. ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndOfCentralDirectory {
    pub entries: u64,
    pub cd_offset: u64,
    pub cd_size: u64,
    pub comment: Vec<u8>,
    /// Where the EOCD record starts in the archive.
    pub eocd_offset: u64,
    /// Where the zip64 EOCD record is, if the archive has one (needs another read
    /// when it is not inside the tail the caller has).
    pub zip64_eocd_offset: Option<u64>,
}

/// Encodes the end records; `cd_offset`/`cd_size` describe the central
/// directory just written at `cd_offset`.
pub fn encode_end(entries: u64, cd_offset: u64, cd_size: u64, comment: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let zip64 = entries >= 0xFFFF || cd_offset >= U32_MAX || cd_size >= U32_MAX;
    if zip64 {
        let zip64_offset = cd_offset + cd_size;
        out.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        out.extend_from_slice(&((ZIP64_EOCD_LEN - 12) as u64).to_le_bytes());
        out.extend_from_slice(&(MADE_BY_UNIX | 63).to_le_bytes());
        out.extend_from_slice(&45u16.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // this disk
        out.extend_from_slice(&0u32.to_le_bytes()); // disk with cd
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&cd_size.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&zip64_offset.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
    }
    let clamp16 = |v: u64| if zip64 { 0xFFFF } else { v as u16 };
    let clamp32 = |v: u64| if zip64 { u32::MAX } else { v as u32 };
    out.extend_from_slice(&EOCD_SIG.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&clamp16(entries).to_le_bytes());
    out.extend_from_slice(&clamp16(entries).to_le_bytes());
    out.extend_from_slice(&clamp32(cd_size).to_le_bytes());
    out.extend_from_slice(&clamp32(cd_offset).to_le_bytes());
    out.extend_from_slice(&(comment.len() as u16).to_le_bytes());
    out.extend_from_slice(comment);
    out
}

/// Finds and decodes the EOCD in `tail`, the last bytes of an archive of
/// `archive_size` bytes. Zip64 values are filled in when the zip64 record is
/// inside `tail`; otherwise `zip64_eocd_offset` says where to read it.
pub fn find_eocd(tail: &[u8], archive_size: u64) -> Result<EndOfCentralDirectory, FormatError> {
    let tail_start = archive_size
        .checked_sub(tail.len() as u64)
        .ok_or(FormatError::Invalid("tail longer than the archive"))?;
    if tail.len() < EOCD_LEN {
        return Err(FormatError::NotZip("too short to be a zip archive"));
    }
    // Scan backwards for a signature whose comment length reaches exactly the end.
    let mut pos = tail.len() - EOCD_LEN;
    loop {
        if tail[pos..pos + 4] == EOCD_SIG.to_le_bytes() {
            let comment_len = u16::from_le_bytes([tail[pos + 20], tail[pos + 21]]) as usize;
            if pos + EOCD_LEN + comment_len == tail.len() {
                return decode_eocd(tail, pos, tail_start);
            }
        }
        if pos == 0 || tail.len() - pos >= MAX_EOCD_SEARCH {
            return Err(FormatError::NotZip(
                "no end of central directory record (not a zip, or truncated)",
            ));
        }
        pos -= 1;
    }
}

fn decode_eocd(
    tail: &[u8],
    pos: usize,
    tail_start: u64,
) -> Result<EndOfCentralDirectory, FormatError> {
    let mut c = Cursor::new(&tail[pos + 4..]);
    let disk = c.u16()?;
    let cd_disk = c.u16()?;
    let _entries_here = c.u16()?;
    let entries = c.u16()?;
    let cd_size = c.u32()?;
    let cd_offset = c.u32()?;
    let comment_len = c.u16()? as usize;
    let comment = c.take(comment_len)?.to_vec();
    if disk != 0 || cd_disk != 0 {
        return Err(FormatError::Unsupported("multi-disk zip archives".into()));
    }
    let eocd_offset = tail_start + pos as u64;
    let mut eocd = EndOfCentralDirectory {
        entries: entries.into(),
        cd_offset: cd_offset.into(),
        cd_size: cd_size.into(),
        comment,
        eocd_offset,
        zip64_eocd_offset: None,
    };
    // A zip64 locator sits right before the EOCD.
    if pos >= ZIP64_LOCATOR_LEN
        && tail[pos - ZIP64_LOCATOR_LEN..pos - ZIP64_LOCATOR_LEN + 4]
            == ZIP64_LOCATOR_SIG.to_le_bytes()
    {
        let mut l = Cursor::new(&tail[pos - ZIP64_LOCATOR_LEN + 4..pos]);
        let _disk = l.u32()?;
        let zip64_offset = l.u64()?;
        if zip64_offset
            .checked_add(ZIP64_EOCD_LEN as u64)
            .is_none_or(|end| end > eocd_offset)
        {
            return Err(FormatError::Invalid(
                "zip64 end record points past the end record",
            ));
        }
        eocd.zip64_eocd_offset = Some(zip64_offset);
        if zip64_offset >= tail_start {
            let start = (zip64_offset - tail_start) as usize;
            apply_zip64_eocd(&mut eocd, &tail[start..])?;
        }
    }
    Ok(eocd)
}

/// Fills the EOCD's counts and offsets from a zip64 end record at the start of `record`.
pub fn apply_zip64_eocd(
    eocd: &mut EndOfCentralDirectory,
    record: &[u8],
) -> Result<(), FormatError> {
    let mut c = Cursor::new(record);
    if c.u32()? != ZIP64_EOCD_SIG {
        return Err(FormatError::Invalid(
            "zip64 end of central directory signature",
        ));
    }
    let _size = c.u64()?;
    let _made_by = c.u16()?;
    let _needed = c.u16()?;
    let _disk = c.u32()?;
    let _cd_disk = c.u32()?;
    let _entries_here = c.u64()?;
    eocd.entries = c.u64()?;
    eocd.cd_size = c.u64()?;
    eocd.cd_offset = c.u64()?;
    eocd.zip64_eocd_offset = None;
    Ok(())
}

/// One central directory record, zip64 values resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentralRecord {
    pub name: Vec<u8>,
    pub made_by: u16,
    pub flags: u16,
    pub method: u16,
    pub dos_time: u16,
    pub dos_date: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub external_attrs: u32,
    pub local_header_offset: u64,
    /// From the extended timestamp extra (0x5455), when present.
    pub mtime_secs: Option<i64>,
}

impl CentralRecord {
    /// st_mode when the writer was a Unix one; None otherwise.
    pub fn unix_mode(&self) -> Option<u32> {
        let mode = self.external_attrs >> 16;
        (self.made_by >> 8 == 3 && mode != 0).then_some(mode)
    }
}

/// Decodes `count` central directory records from `buf`.
pub fn decode_central_directory(buf: &[u8], count: u64) -> Result<Vec<CentralRecord>, FormatError> {
    // Each record is at least 46 bytes: a count beyond that is a lie, not an allocation size.
    if count > (buf.len() / CENTRAL_HEADER_LEN) as u64 {
        return Err(FormatError::Invalid(
            "central directory entry count exceeds its size",
        ));
    }
    let mut c = Cursor::new(buf);
    let mut records = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if c.u32()? != CENTRAL_HEADER_SIG {
            return Err(FormatError::Invalid("central directory record signature"));
        }
        let made_by = c.u16()?;
        let _needed = c.u16()?;
        let flags = c.u16()?;
        let method = c.u16()?;
        let dos_time = c.u16()?;
        let dos_date = c.u16()?;
        let crc32 = c.u32()?;
        let mut compressed_size = u64::from(c.u32()?);
        let mut uncompressed_size = u64::from(c.u32()?);
        let name_len = c.u16()? as usize;
        let extra_len = c.u16()? as usize;
        let comment_len = c.u16()? as usize;
        let _disk = c.u16()?;
        let _internal = c.u16()?;
        let external_attrs = c.u32()?;
        let mut local_header_offset = u64::from(c.u32()?);
        let name = c.take(name_len)?.to_vec();
        let extra = c.take(extra_len)?;
        c.take(comment_len)?;
        if flags & 1 != 0 {
            return Err(FormatError::Unsupported(format!(
                "encrypted entry {}",
                String::from_utf8_lossy(&name)
            )));
        }
        let mut mtime_secs = None;
        for (tag, data) in extra_fields(extra) {
            match tag {
                EXTRA_ZIP64 => {
                    let mut z = Cursor::new(data);
                    if uncompressed_size == U32_MAX {
                        uncompressed_size = z.u64()?;
                    }
                    if compressed_size == U32_MAX {
                        compressed_size = z.u64()?;
                    }
                    if local_header_offset == U32_MAX {
                        local_header_offset = z.u64()?;
                    }
                }
                EXTRA_EXT_TIMESTAMP if data.len() >= 5 && data[0] & 1 != 0 => {
                    mtime_secs = Some(i64::from(u32::from_le_bytes(
                        data[1..5].try_into().unwrap(),
                    )));
                }
                _ => {}
            }
        }
        records.push(CentralRecord {
            name,
            made_by,
            flags,
            method,
            dos_time,
            dos_date,
            crc32,
            compressed_size,
            uncompressed_size,
            external_attrs,
            local_header_offset,
            mtime_secs,
        });
    }
    Ok(records)
}

/// Splits an extra field block into (tag, data) pairs; a malformed tail is ignored
/// (as other zip readers do), never read out of bounds.
fn extra_fields(mut extra: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if extra.len() < 4 {
            return None;
        }
        let tag = u16::from_le_bytes([extra[0], extra[1]]);
        let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
        if 4 + len > extra.len() {
            return None;
        }
        let data = &extra[4..4 + len];
        extra = &extra[4 + len..];
        Some((tag, data))
    })
}

/// From a local header at the start of `buf`, the distance from the header to
/// its entry's data (header + name + extra).
pub fn local_header_data_start(buf: &[u8]) -> Result<u64, FormatError> {
    let mut c = Cursor::new(buf);
    if c.u32()? != LOCAL_HEADER_SIG {
        return Err(FormatError::Invalid("local file header signature"));
    }
    c.take(22)?;
    let name_len = u64::from(c.u16()?);
    let extra_len = u64::from(c.u16()?);
    Ok(LOCAL_HEADER_LEN as u64 + name_len + extra_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_time_round_trips_to_two_seconds() {
        for secs in [315_532_800i64, 1_700_000_000, 1_700_000_001, 4_000_000_000] {
            let (t, d) = dos_datetime(secs);
            assert_eq!(dos_to_unix(t, d), secs - secs % 2);
        }
    }

    #[test]
    fn eocd_round_trip_with_and_without_zip64() {
        for entries in [3u64, 70_000] {
            let (off, size) = (10u64, 0u64);
            let mut archive = vec![0u8; 10];
            archive.extend(encode_end(entries, off, size, b"hello"));
            let total = archive.len() as u64;
            let e = find_eocd(&archive, total).unwrap();
            assert_eq!((e.entries, e.cd_offset, e.cd_size), (entries, off, size));
            assert_eq!(e.comment, b"hello");
        }
    }

    /// Found by fuzzing (`eocd`): a zip64 locator offset near u64::MAX
    /// overflowed the check that it lies before the EOCD, then sliced past the tail.
    #[test]
    fn a_zip64_locator_offset_near_the_top_is_refused() {
        let mut archive = vec![0u8; 10];
        archive.extend(encode_end(70_000, 10, 0, b""));
        let locator = archive.len() - EOCD_LEN - ZIP64_LOCATOR_LEN;
        archive[locator + 8..locator + 16].copy_from_slice(&(u64::MAX - 5).to_le_bytes());
        let total = archive.len() as u64;
        assert!(matches!(
            find_eocd(&archive, total),
            Err(FormatError::Invalid(_))
        ));
    }

    #[test]
    fn garbage_is_not_a_zip() {
        assert!(matches!(
            find_eocd(&[0u8; 100], 100),
            Err(FormatError::NotZip(_))
        ));
    }
}
