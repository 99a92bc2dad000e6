//! Files of the SPANN index's disk tier: posting pages and rerank vectors.
//!
//! **Posting file** (`postings-GEN.dat`, kind `SPPS`): page 0 holds the
//! 32-byte header (see [`super::format`]) padded with zeros to [`PAGE`]; every
//! later page is
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4092 | payload bytes (a slice of one posting's stream, zero padded) |
//! | 4092 | 4 | CRC-32 of the payload followed by the page number (u64 LE) |
//!
//! Binding the page number into the CRC makes a page read from the wrong
//! place fail like a damaged one. A posting is a run of whole pages, so it is
//! one aligned positional read. Its stream, split over the pages' payloads, is
//! columnar ([`PostingData::encode`]):
//!
//! | field | size |
//! |---|---|
//! | entry count `n` | u32 |
//! | head id | u32 |
//! | row ids | `n` x u32 |
//! | row versions | `n` x u8, padded to 4 bytes |
//! | aux (squared norm of the decoded code, for L2) | `n` x f32 |
//! | int8 codes | `n` x `dim` bytes |
//! | 1-bit filter codes (files of minor version >= 1) | `n` x `ceil(dim / 8)` bytes |
//! | filter factors `f, k, e` (files of minor version >= 1) | `n` x 3 x f32 |
//!
//! The filter columns (see `index::spann::bits`) come after the codes, so a
//! reader of minor 0 still reads such a stream (and ignores them); a file of
//! minor 0 has none, and its postings get them computed when read.
//!
//! **Vector file** (`vectors-GEN.dat`, kind `SPVC`): the header padded to
//! [`PAGE`], then one record per row at `PAGE + row * (4 * dim + 4)`: the
//! row's full-precision vector (f32 LE) and a CRC-32 of those bytes followed
//! by the row number (u64 LE).

use super::format::{Header, Kind, HEADER_LEN};
use crate::error::{Error, IoContext, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Page size of the posting file.
pub const PAGE: usize = 4096;
/// Payload bytes per page (the last four hold the CRC).
pub const PAGE_PAYLOAD: usize = PAGE - 4;

fn page_crc(payload: &[u8], page_no: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(payload);
    h.update(&page_no.to_le_bytes());
    h.finalize()
}

/// Pages needed for a stream of `len` bytes (at least one).
pub fn pages_for(len: usize) -> usize {
    len.div_ceil(PAGE_PAYLOAD).max(1)
}

/// Cut `payload` into checksummed pages numbered from `first_page`.
pub fn paginate(payload: &[u8], first_page: u64) -> Vec<u8> {
    let n = pages_for(payload.len());
    let mut out = vec![0u8; n * PAGE];
    for i in 0..n {
        let src = &payload
            [(i * PAGE_PAYLOAD).min(payload.len())..((i + 1) * PAGE_PAYLOAD).min(payload.len())];
        let page = &mut out[i * PAGE..(i + 1) * PAGE];
        page[..src.len()].copy_from_slice(src);
        let crc = page_crc(&page[..PAGE_PAYLOAD], first_page + i as u64);
        page[PAGE_PAYLOAD..].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

/// Check every page of `pages` (numbered from `first_page`) and return the
/// concatenated payloads.
pub fn unpaginate(pages: &[u8], first_page: u64, file: &Path) -> Result<Vec<u8>> {
    if !pages.len().is_multiple_of(PAGE) {
        return Err(Error::corruption(
            file,
            format!("posting read of {} bytes is not whole pages", pages.len()),
        ));
    }
    let mut out = Vec::with_capacity(pages.len() / PAGE * PAGE_PAYLOAD);
    for (i, page) in pages.chunks_exact(PAGE).enumerate() {
        let no = first_page + i as u64;
        let want = u32::from_le_bytes(page[PAGE_PAYLOAD..].try_into().unwrap());
        if page_crc(&page[..PAGE_PAYLOAD], no) != want {
            return Err(Error::corruption(
                file,
                format!("posting page {no} failed its checksum"),
            ));
        }
        out.extend_from_slice(&page[..PAGE_PAYLOAD]);
    }
    Ok(out)
}

/// One posting list in columnar form: row ids, the version each row had when
/// the entry was written, an auxiliary float per entry, `dim` int8 codes
/// per entry, and the entry's 1-bit filter code (`dim / 8` bytes, rounded up)
/// with its three factors (see `index::spann::bits`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostingData {
    pub rows: Vec<u32>,
    pub versions: Vec<u8>,
    pub aux: Vec<f32>,
    pub codes: Vec<i8>,
    pub bits: Vec<u8>,
    /// `(f, k, e)` per entry.
    pub filt: Vec<[f32; 3]>,
}

/// Bytes of one entry's 1-bit filter code.
pub fn bit_bytes(dim: usize) -> usize {
    dim.div_ceil(8)
}

impl PostingData {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn push(
        &mut self,
        row: u32,
        version: u8,
        aux: f32,
        code: &[i8],
        bits: &[u8],
        filt: [f32; 3],
    ) {
        self.rows.push(row);
        self.versions.push(version);
        self.aux.push(aux);
        self.codes.extend_from_slice(code);
        self.bits.extend_from_slice(bits);
        self.filt.push(filt);
    }

    /// Whether the filter columns cover every entry.
    pub fn has_filter(&self, dim: usize) -> bool {
        self.filt.len() == self.rows.len() && self.bits.len() == self.rows.len() * bit_bytes(dim)
    }

    /// Keep only the entries for which `keep(i)` is true.
    pub fn retain_idx(&mut self, dim: usize, mut keep: impl FnMut(usize) -> bool) {
        let nb = bit_bytes(dim);
        let filt = self.has_filter(dim);
        let mut w = 0;
        for r in 0..self.rows.len() {
            if keep(r) {
                if w != r {
                    self.rows[w] = self.rows[r];
                    self.versions[w] = self.versions[r];
                    self.aux[w] = self.aux[r];
                    self.codes.copy_within(r * dim..(r + 1) * dim, w * dim);
                    if filt {
                        self.bits.copy_within(r * nb..(r + 1) * nb, w * nb);
                        self.filt[w] = self.filt[r];
                    }
                }
                w += 1;
            }
        }
        self.rows.truncate(w);
        self.versions.truncate(w);
        self.aux.truncate(w);
        self.codes.truncate(w * dim);
        if filt {
            self.bits.truncate(w * nb);
            self.filt.truncate(w);
        } else {
            self.bits.clear();
            self.filt.clear();
        }
    }

    /// Bytes this posting holds in RAM.
    pub fn ram_bytes(&self) -> usize {
        self.rows.capacity() * 4
            + self.versions.capacity()
            + self.aux.capacity() * 4
            + self.codes.capacity()
            + self.bits.capacity()
            + self.filt.capacity() * 12
    }

    /// Length of the encoded stream.
    pub fn encoded_len(&self, dim: usize, filter: bool) -> usize {
        let n = self.rows.len();
        let extra = if filter { n * (bit_bytes(dim) + 12) } else { 0 };
        8 + 4 * n + n.div_ceil(4) * 4 + 4 * n + n * dim + extra
    }

    /// Encode as the columnar stream described in the module docs; with
    /// `filter`, the filter columns follow the codes (the posting must hold
    /// them: see [`PostingData::has_filter`]).
    pub fn encode(&self, head: u32, dim: usize, filter: bool) -> Vec<u8> {
        assert!(
            !filter || self.has_filter(dim),
            "posting lacks its filter codes"
        );
        let n = self.rows.len();
        let mut b = Vec::with_capacity(self.encoded_len(dim, filter));
        b.extend_from_slice(&(n as u32).to_le_bytes());
        b.extend_from_slice(&head.to_le_bytes());
        for r in &self.rows {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b.extend_from_slice(&self.versions);
        b.resize(b.len() + (n.div_ceil(4) * 4 - n), 0);
        for a in &self.aux {
            b.extend_from_slice(&a.to_le_bytes());
        }
        b.extend(self.codes.iter().map(|&c| c as u8));
        if filter {
            b.extend_from_slice(&self.bits);
            for f in &self.filt {
                for x in f {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        b
    }

    /// Decode a stream (possibly followed by page padding); checks the count
    /// against the bytes present and the head id against `want_head`.
    pub fn decode(
        payload: &[u8],
        dim: usize,
        want_head: u32,
        file: &Path,
        filter: bool,
    ) -> Result<PostingData> {
        let bad = |d: String| Error::corruption(file, d);
        if payload.len() < 8 {
            return Err(bad("posting stream shorter than its 8-byte prefix".into()));
        }
        let n = u32::from_le_bytes(payload[0..4].try_into().unwrap()) as usize;
        let head = u32::from_le_bytes(payload[4..8].try_into().unwrap());
        if head != want_head {
            return Err(bad(format!(
                "posting of head {want_head} holds head id {head}"
            )));
        }
        // ids, versions padded to 4 bytes, aux, codes: exactly what the
        // slices below take (the version padding is up to 3 bytes more than
        // `n`, so a bound of `8 + n * (8 + dim) + 4` was short by up to
        // `n / 4` bytes and let a damaged count slice past the end).
        let per = dim + if filter { bit_bytes(dim) + 12 } else { 0 };
        let need = n
            .checked_mul(per)
            .and_then(|codes| codes.checked_add(8 + 8 * n + n.div_ceil(4) * 4))
            .ok_or_else(|| bad("count overflow".into()))?;
        if need > payload.len() {
            return Err(bad(format!(
                "posting of head {head} claims {n} entries, more than its {} bytes hold",
                payload.len()
            )));
        }
        let mut p = 8;
        let rows = payload[p..p + 4 * n]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        p += 4 * n;
        let versions = payload[p..p + n].to_vec();
        p += n.div_ceil(4) * 4;
        let aux = payload[p..p + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        p += 4 * n;
        let codes = payload[p..p + n * dim].iter().map(|&c| c as i8).collect();
        p += n * dim;
        let (mut bits, mut filt) = (Vec::new(), Vec::new());
        if filter {
            let nb = bit_bytes(dim);
            bits = payload[p..p + n * nb].to_vec();
            p += n * nb;
            filt = payload[p..p + 12 * n]
                .chunks_exact(12)
                .map(|c| {
                    let f = |i: usize| f32::from_le_bytes(c[i..i + 4].try_into().unwrap());
                    [f(0), f(4), f(8)]
                })
                .collect();
        }
        Ok(PostingData {
            rows,
            versions,
            aux,
            codes,
            bits,
            filt,
        })
    }
}

/// Minor format version of posting files whose streams carry the 1-bit
/// filter columns after the codes (files of minor 0 lack them: their
/// postings get the columns computed when read).
pub const POSTINGS_MINOR_FILTER: u16 = 1;

fn pad_header(kind: Kind, generation: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    let mut h = Header::new(kind, generation);
    if kind == Kind::SpannPostings {
        h.minor = h.minor.max(POSTINGS_MINOR_FILTER);
    }
    b[..HEADER_LEN].copy_from_slice(&h.encode());
    b
}

fn open_checked(path: &Path, kind: Kind, writable: bool) -> Result<File> {
    open_header(path, kind, writable).map(|x| x.0)
}

fn open_header(path: &Path, kind: Kind, writable: bool) -> Result<(File, Header)> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .at(path)?;
    let mut h = [0u8; HEADER_LEN];
    let got = file.read_at(&mut h, 0).at(path)?;
    let h = Header::decode(&h[..got], kind, path)?;
    Ok((file, h))
}

/// `O_DIRECT` for this target (Linux), so reads bypass the page cache.
#[cfg(all(target_os = "linux", any(target_arch = "aarch64", target_arch = "arm")))]
const O_DIRECT: i32 = 0o200000;
#[cfg(all(
    target_os = "linux",
    not(any(target_arch = "aarch64", target_arch = "arm"))
))]
const O_DIRECT: i32 = 0o40000;

/// A second, read-only handle opened with `O_DIRECT` where the OS and file
/// system allow it (`None` otherwise: reads then go through the page cache).
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .read(true)
            .custom_flags(O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Read `len` bytes at `off` through an `O_DIRECT` handle: the read is
/// widened to whole aligned pages into an aligned buffer.
fn read_direct(file: &File, path: &Path, off: u64, len: usize) -> Result<Vec<u8>> {
    let start = off / PAGE as u64 * PAGE as u64;
    let end = (off + len as u64).div_ceil(PAGE as u64) * PAGE as u64;
    let span = (end - start) as usize;
    let mut raw = vec![0u8; span + PAGE];
    let a = raw.as_ptr().align_offset(PAGE);
    let buf = &mut raw[a..a + span];
    let mut got = 0;
    while got < span {
        match file.read_at(&mut buf[got..], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Io {
                    file: path.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    let lo = (off - start) as usize;
    if got < lo + len {
        return Err(Error::corruption(
            path,
            format!("file truncated: read of {len} bytes at {off}"),
        ));
    }
    Ok(buf[lo..lo + len].to_vec())
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], off: u64) -> Result<()> {
    file.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corruption(
                path,
                format!("file truncated: read of {} bytes at {off}", buf.len()),
            )
        } else {
            Error::Io {
                file: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// The posting file: appended page runs read back by positional reads.
#[derive(Debug)]
pub struct PostingFile {
    file: File,
    direct: Option<File>,
    path: PathBuf,
    /// Pages in the file, header page included.
    pages: u64,
    /// Streams carry the filter columns (minor >= [`POSTINGS_MINOR_FILTER`]).
    filter: bool,
}

impl PostingFile {
    pub fn create(path: &Path, generation: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path)?;
        file.write_all_at(&pad_header(Kind::SpannPostings, generation), 0)
            .at(path)?;
        Ok(PostingFile {
            file,
            direct: None,
            path: path.to_path_buf(),
            pages: 1,
            filter: true,
        })
    }

    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let (file, h) = open_header(path, Kind::SpannPostings, writable)?;
        let len = file.metadata().at(path)?.len();
        Ok(PostingFile {
            file,
            direct: None,
            path: path.to_path_buf(),
            pages: len / PAGE as u64,
            filter: h.minor >= POSTINGS_MINOR_FILTER,
        })
    }

    /// Whether this file's posting streams carry the filter columns (every
    /// posting of a file has them or none does).
    pub fn has_filter(&self) -> bool {
        self.filter
    }

    /// Whether reads go through an `O_DIRECT` handle.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Read through an `O_DIRECT` handle from now on (bypassing the page
    /// cache); returns whether the file system allowed it.
    pub fn use_direct_io(&mut self, on: bool) -> bool {
        self.direct = if on { open_direct(&self.path) } else { None };
        self.direct.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> u64 {
        self.pages * PAGE as u64
    }

    /// Append a posting stream; returns (first page, page count).
    pub fn append(&mut self, stream: &[u8]) -> Result<(u64, u32)> {
        let first = self.pages;
        let pages = paginate(stream, first);
        self.file
            .write_all_at(&pages, first * PAGE as u64)
            .at(&self.path)?;
        let n = (pages.len() / PAGE) as u64;
        self.pages += n;
        Ok((first, n as u32))
    }

    /// Read and check `n` pages from `first`; returns the payload stream.
    pub fn read(&self, first: u64, n: u32) -> Result<Vec<u8>> {
        if first == 0 || first.saturating_add(n as u64) > self.pages {
            return Err(Error::corruption(
                &self.path,
                format!(
                    "posting pages {first}..{} outside the file's {} pages",
                    first.saturating_add(n as u64),
                    self.pages
                ),
            ));
        }
        if let Some(d) = &self.direct {
            let buf = read_direct(d, &self.path, first * PAGE as u64, n as usize * PAGE)?;
            return unpaginate(&buf, first, &self.path);
        }
        let mut buf = vec![0u8; n as usize * PAGE];
        read_exact_at(&self.file, &self.path, &mut buf, first * PAGE as u64)?;
        unpaginate(&buf, first, &self.path)
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().at(&self.path)
    }
}

/// The vector file: one fixed-size checksummed record per row.
#[derive(Debug)]
pub struct VectorFile {
    file: File,
    direct: Option<File>,
    path: PathBuf,
    dim: usize,
    rows: u64,
}

impl VectorFile {
    fn rec_len(dim: usize) -> usize {
        dim * 4 + 4
    }

    pub fn create(path: &Path, generation: u64, dim: usize) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path)?;
        file.write_all_at(&pad_header(Kind::SpannVectors, generation), 0)
            .at(path)?;
        Ok(VectorFile {
            file,
            direct: None,
            path: path.to_path_buf(),
            dim,
            rows: 0,
        })
    }

    /// Open a vector file that holds at least `rows` rows.
    pub fn open(path: &Path, dim: usize, rows: u64, writable: bool) -> Result<Self> {
        let file = open_checked(path, Kind::SpannVectors, writable)?;
        let len = file.metadata().at(path)?.len();
        let need = (Self::rec_len(dim) as u64)
            .checked_mul(rows)
            .and_then(|b| b.checked_add(PAGE as u64));
        if need.is_none_or(|need| len < need) {
            return Err(Error::corruption(
                path,
                format!("vector file is {len} bytes, too short for {rows} rows of dimension {dim}"),
            ));
        }
        Ok(VectorFile {
            file,
            direct: None,
            path: path.to_path_buf(),
            dim,
            rows,
        })
    }

    /// Read through an `O_DIRECT` handle from now on; returns whether the
    /// file system allowed it.
    pub fn use_direct_io(&mut self, on: bool) -> bool {
        self.direct = if on { open_direct(&self.path) } else { None };
        self.direct.is_some()
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn bytes(&self) -> u64 {
        PAGE as u64 + self.rows * Self::rec_len(self.dim) as u64
    }

    /// Append rows (row-major, `dim` wide).
    pub fn append(&mut self, vectors: &[f32]) -> Result<()> {
        let rl = Self::rec_len(self.dim);
        let n = vectors.len() / self.dim;
        let mut buf = vec![0u8; n * rl];
        for (i, v) in vectors.chunks_exact(self.dim).enumerate() {
            let rec = &mut buf[i * rl..(i + 1) * rl];
            for (j, x) in v.iter().enumerate() {
                rec[j * 4..j * 4 + 4].copy_from_slice(&x.to_le_bytes());
            }
            let crc = page_crc(&rec[..self.dim * 4], self.rows + i as u64);
            rec[self.dim * 4..].copy_from_slice(&crc.to_le_bytes());
        }
        let off = PAGE as u64 + self.rows * rl as u64;
        self.file.write_all_at(&buf, off).at(&self.path)?;
        self.rows += n as u64;
        Ok(())
    }

    /// Read row `row` into `out` (`dim` floats), checking its CRC.
    pub fn read(&self, row: u64, out: &mut [f32]) -> Result<()> {
        let rl = Self::rec_len(self.dim);
        if row >= self.rows {
            return Err(Error::corruption(
                &self.path,
                format!("row {row} beyond the file's {} rows", self.rows),
            ));
        }
        let mut buf = vec![0u8; rl];
        read_exact_at(
            &self.file,
            &self.path,
            &mut buf,
            PAGE as u64 + row * rl as u64,
        )?;
        let want = u32::from_le_bytes(buf[self.dim * 4..].try_into().unwrap());
        if page_crc(&buf[..self.dim * 4], row) != want {
            return Err(Error::corruption(
                &self.path,
                format!("vector record of row {row} failed its checksum"),
            ));
        }
        for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
            *o = f32::from_le_bytes(c.try_into().unwrap());
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().at(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_and_detect_flips() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let pages = paginate(&payload, 5);
        assert_eq!(pages.len(), 3 * PAGE);
        let back = unpaginate(&pages, 5, Path::new("p")).unwrap();
        assert_eq!(&back[..payload.len()], &payload[..]);
        assert!(
            unpaginate(&pages, 6, Path::new("p")).is_err(),
            "wrong place"
        );
        for pos in [0, 100, 4095, 5000, 3 * PAGE - 1] {
            let mut bad = pages.clone();
            bad[pos] ^= 1;
            assert!(matches!(
                unpaginate(&bad, 5, Path::new("p")),
                Err(Error::Corruption { .. })
            ));
        }
    }

    #[test]
    fn posting_stream_round_trip_and_bounds() {
        let dim = 5;
        let mut p = PostingData::default();
        for i in 0..7u32 {
            let code: Vec<i8> = (0..dim).map(|j| (i as i8) * 3 - j as i8).collect();
            let f = [i as f32, -(i as f32), 0.25 * i as f32];
            p.push(i * 10, i as u8, i as f32 * 0.5, &code, &[i as u8 * 17], f);
        }
        for filter in [true, false] {
            let s = p.encode(42, dim, filter);
            assert_eq!(s.len(), p.encoded_len(dim, filter));
            let mut padded = s.clone();
            padded.resize(PAGE_PAYLOAD, 0);
            let back = PostingData::decode(&padded, dim, 42, Path::new("x"), filter).unwrap();
            if filter {
                assert_eq!(back, p);
            } else {
                assert_eq!((&back.rows, &back.codes), (&p.rows, &p.codes));
                assert!(back.bits.is_empty() && back.filt.is_empty());
            }
            // a stream with the filter columns also reads without them
            let old = PostingData::decode(&padded, dim, 42, Path::new("x"), false).unwrap();
            assert_eq!(
                (&old.rows, &old.aux, &old.codes),
                (&p.rows, &p.aux, &p.codes)
            );
            assert!(PostingData::decode(&padded, dim, 41, Path::new("x"), filter).is_err());
            let mut huge = s.clone();
            huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(PostingData::decode(&huge, dim, 42, Path::new("x"), filter).is_err());
        }
        // a stream cut inside its filter columns is refused, not misread
        let s = p.encode(42, dim, true);
        let cut = &s[..s.len() - 1];
        assert!(PostingData::decode(cut, dim, 42, Path::new("x"), true).is_err());
        p.retain_idx(dim, |i| i % 2 == 0);
        assert_eq!(p.rows, vec![0, 20, 40, 60]);
        assert_eq!(&p.codes[dim..2 * dim], &[6, 5, 4, 3, 2]);
        assert_eq!(p.bits, vec![0, 34, 68, 102]);
        assert_eq!(p.filt[3], [6.0, -6.0, 1.5]);
    }

    #[test]
    fn filter_columns_are_under_the_page_checksums() {
        let dim = 16;
        let mut p = PostingData::default();
        for i in 0..20u32 {
            let code = vec![i as i8; dim];
            p.push(i, 0, 1.0, &code, &[i as u8, 1], [0.5, 0.25, i as f32]);
        }
        let s = p.encode(3, dim, true);
        let pages = paginate(&s, 1);
        // every byte of the filter columns (after the codes)
        let start = p.encoded_len(dim, false);
        for off in [start, start + 7, s.len() - 1] {
            let mut bad = pages.clone();
            let at = (off / PAGE_PAYLOAD) * PAGE + off % PAGE_PAYLOAD;
            bad[at] ^= 0x10;
            assert!(matches!(
                unpaginate(&bad, 1, Path::new("p")),
                Err(Error::Corruption { .. })
            ));
        }
    }

    #[test]
    fn a_minor_0_posting_file_has_no_filter_columns() {
        let dir = tempfile::tempdir().unwrap();
        let pp = dir.path().join("p.dat");
        drop(PostingFile::create(&pp, 1).unwrap());
        assert!(PostingFile::open(&pp, false).unwrap().has_filter());
        // rewrite the header as an older writer did
        let mut b = std::fs::read(&pp).unwrap();
        let mut h = Header::new(Kind::SpannPostings, 1);
        h.minor = 0;
        b[..HEADER_LEN].copy_from_slice(&h.encode());
        std::fs::write(&pp, &b).unwrap();
        assert!(!PostingFile::open(&pp, false).unwrap().has_filter());
    }

    #[test]
    fn files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pp = dir.path().join("p.dat");
        let mut pf = PostingFile::create(&pp, 1).unwrap();
        let (first, n) = pf.append(&[1, 2, 3]).unwrap();
        assert_eq!((first, n), (1, 1));
        let (first2, _) = pf.append(&vec![9u8; 5000]).unwrap();
        assert_eq!(first2, 2);
        drop(pf);
        let pf = PostingFile::open(&pp, false).unwrap();
        assert_eq!(&pf.read(1, 1).unwrap()[..3], &[1, 2, 3]);
        assert_eq!(pf.read(2, 2).unwrap()[4999], 9);
        assert!(pf.read(3, 5).is_err());

        let vp = dir.path().join("v.dat");
        let mut vf = VectorFile::create(&vp, 1, 3).unwrap();
        vf.append(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        drop(vf);
        let vf = VectorFile::open(&vp, 3, 2, false).unwrap();
        let mut out = [0f32; 3];
        vf.read(1, &mut out).unwrap();
        assert_eq!(out, [4.0, 5.0, 6.0]);
        assert!(VectorFile::open(&vp, 3, 3, false).is_err());
        // O_DIRECT reads (where the file system allows them) agree
        let mut vf = VectorFile::open(&vp, 3, 2, false).unwrap();
        vf.use_direct_io(true);
        let mut out2 = [0f32; 3];
        vf.read(1, &mut out2).unwrap();
        assert_eq!(out2, [4.0, 5.0, 6.0]);
        let mut pf = PostingFile::open(&pp, false).unwrap();
        pf.use_direct_io(true);
        assert_eq!(pf.read(2, 2).unwrap()[4999], 9);
    }
}
