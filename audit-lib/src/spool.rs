//! A small, crash-safe, bounded local store of audit records not yet acknowledged by Kafka.
//!
//! Every process owns one file under the spool directory, `audit-<pid>-<uuid>.spool`, next
//! to a `.lock` file it holds an exclusive lock on for its whole life. A record is written
//! as one line, `<fnv-1a 64 checksum, 16 hex digits> <encoded audit record>\n`, and the file
//! is fsync'd before [`Spool::append`] returns. Removing acknowledged records truncates the
//! file (when nothing is left) or rewrites it through a temporary file, fsync and rename.
//!
//! On [`Spool::open`], spool files of processes that are gone (their lock can be taken) are
//! adopted: their records, ids unchanged, move into the new process's file, then the old
//! files are deleted. A file whose last lines are cut short (a crash mid-write, before the
//! fsync returned) loses only those lines. A file with a bad line followed by good ones is
//! corrupt: its good records are adopted and the file is renamed to `*.corrupt-<ms>` for an
//! operator to look at; it never stops the process.
//!
//! The line format carries nothing but the record: what the reporter needs besides the bytes
//! (the logical topic it keys the Kafka message with, the bucket of a counts record) is read
//! back from the record itself ([`EncodedRecord::decode`]), so files written by earlier
//! versions are adopted and re-sent like any other.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::record::{AuditRecord, DecodeError};

const SPOOL_EXT: &str = "spool";
const LOCK_EXT: &str = "lock";
const TMP_EXT: &str = "spool.tmp";

/// A spool operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// Reading or writing the spool directory failed.
    #[error("spool i/o on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The new spool file could not be locked (should not happen: its name is unique).
    #[error("spool file {0} is locked by another process")]
    Locked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An encoded audit record, with what sending it and holding back watermarks for it need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    /// The record's id.
    pub id: String,
    /// Its logical topic: the key of the Kafka message that carries it, so that every record
    /// of one topic lands on one partition of the audit topic, in the order it was sent.
    pub topic: String,
    /// For a counts record, the start of its bucket; `None` for progress.
    pub bucket_start_ms: Option<i64>,
    /// The JSON wire form ([`AuditRecord::encode`]).
    pub bytes: Vec<u8>,
}

impl EncodedRecord {
    /// Encodes `record`.
    pub fn new(record: &AuditRecord) -> Self {
        Self::with_bytes(record, record.encode())
    }

    /// Reads an encoded record back (strictly, with [`AuditRecord::decode`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(Self::with_bytes(
            &AuditRecord::decode(bytes)?,
            bytes.to_vec(),
        ))
    }

    fn with_bytes(record: &AuditRecord, bytes: Vec<u8>) -> Self {
        Self {
            id: record.id().to_owned(),
            topic: record.topic().to_owned(),
            bucket_start_ms: match record {
                AuditRecord::Counts(c) => Some(c.bucket_start_ms),
                AuditRecord::Progress(_) => None,
            },
            bytes,
        }
    }
}

/// What [`Spool::open`] found in the spool directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Spool files of earlier processes adopted (and deleted or quarantined).
    pub adopted_files: usize,
    /// Records taken over from those files.
    pub adopted_records: usize,
    /// Files renamed aside because they were corrupt.
    pub quarantined: Vec<PathBuf>,
    /// Lines dropped from the ends of files cut short by a crash.
    pub torn_lines: usize,
    /// Records that did not fit under the size bound and stayed in their old file.
    pub left_behind: usize,
}

/// The spool of one process. See the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    stem: String,
    path: PathBuf,
    file: File,
    _lock: File,
    pending: BTreeMap<String, EncodedRecord>,
    bytes: u64,
    max_bytes: u64,
}

/// FNV-1a, 64 bits: enough to tell a damaged line from a good one.
fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The spool line for an encoded record.
fn line(encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded.len() + 18);
    out.extend_from_slice(format!("{:016x} ", checksum(encoded)).as_bytes());
    out.extend_from_slice(encoded);
    out.push(b'\n');
    out
}

fn parse_line(l: &[u8]) -> Option<EncodedRecord> {
    if l.len() < 18 || l[16] != b' ' {
        return None;
    }
    let sum = u64::from_str_radix(std::str::from_utf8(&l[..16]).ok()?, 16).ok()?;
    let body = &l[17..];
    if checksum(body) != sum {
        return None;
    }
    EncodedRecord::decode(body).ok()
}

/// The records read from one spool file.
#[derive(Debug, Default)]
struct Parsed {
    records: Vec<EncodedRecord>,
    corrupt: bool,
    torn: usize,
}

fn parse_file(data: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    // Lines whose fate depends on whether a good line follows them.
    let mut bad_run = 0usize;
    let mut rest = data;
    while !rest.is_empty() {
        let (l, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let l = &rest[..i];
                rest = &rest[i + 1..];
                (l, true)
            }
            None => {
                let l = rest;
                rest = &[];
                (l, false)
            }
        };
        match (complete, parse_line(l)) {
            (true, Some(r)) => {
                if bad_run > 0 {
                    out.corrupt = true;
                    bad_run = 0;
                }
                out.records.push(r);
            }
            _ => bad_run += 1,
        }
    }
    out.torn = bad_run;
    out
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Spool {
    /// Opens a new spool file for this process under `dir` (created if missing) and adopts
    /// the records of spool files left there by processes that are gone.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, OpenReport), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let stem = format!(
            "audit-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let lock_path = dir.join(format!("{stem}.{LOCK_EXT}"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(SpoolError::Locked(lock_path)),
            Err(TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let path = dir.join(format!("{stem}.{SPOOL_EXT}"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(dir)?;
        let mut spool = Self {
            dir: dir.to_owned(),
            stem,
            path,
            file,
            _lock: lock,
            pending: BTreeMap::new(),
            bytes: 0,
            max_bytes,
        };
        let report = spool.adopt_orphans()?;
        Ok((spool, report))
    }

    fn adopt_orphans(&mut self) -> Result<OpenReport, SpoolError> {
        let mut report = OpenReport::default();
        let mut stems: Vec<String> = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stem = name
                .strip_suffix(&format!(".{SPOOL_EXT}"))
                .or_else(|| name.strip_suffix(&format!(".{LOCK_EXT}")))
                .or_else(|| name.strip_suffix(&format!(".{TMP_EXT}")));
            if let Some(stem) = stem
                && stem != self.stem
                && !stems.iter().any(|s| s == stem)
            {
                stems.push(stem.to_owned());
            }
        }
        stems.sort();
        for stem in stems {
            self.adopt(&stem, &mut report)?;
        }
        Ok(report)
    }

    /// Adopts the spool of `stem` if its owner is gone.
    fn adopt(&mut self, stem: &str, report: &mut OpenReport) -> Result<(), SpoolError> {
        let lock_path = self.dir.join(format!("{stem}.{LOCK_EXT}"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(()), // a live process owns it
            Err(TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let path = self.dir.join(format!("{stem}.{SPOOL_EXT}"));
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let parsed = parse_file(&data);
        let fresh: Vec<EncodedRecord> = parsed
            .records
            .into_iter()
            .filter(|r| !self.pending.contains_key(&r.id))
            .collect();
        let size: u64 = fresh.iter().map(|r| line(&r.bytes).len() as u64).sum();
        if self.bytes + size > self.max_bytes {
            // Leave the whole file for a later process (or a later start) with more room.
            report.left_behind += fresh.len();
            tracing::warn!(
                file = %path.display(),
                records = fresh.len(),
                "spool is full: leaving an old spool file in place for a later start"
            );
            return Ok(());
        }
        let adopted = fresh.len();
        let not_stored = self.append(fresh)?;
        debug_assert!(not_stored.is_empty());
        report.adopted_files += 1;
        report.adopted_records += adopted;
        report.torn_lines += parsed.torn;
        if parsed.torn > 0 {
            tracing::warn!(file = %path.display(), lines = parsed.torn, "dropped lines cut short by a crash from an old spool file");
        }
        if parsed.corrupt {
            let aside = self.dir.join(format!(
                "{stem}.{SPOOL_EXT}.corrupt-{}",
                chrono::Utc::now().timestamp_millis()
            ));
            fs::rename(&path, &aside).map_err(io_err(&path))?;
            tracing::error!(
                file = %aside.display(),
                records = adopted,
                "spool file is corrupt: adopted its readable records and moved it aside"
            );
            report.quarantined.push(aside);
        } else if !data.is_empty() || path.exists() {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        let tmp = self.dir.join(format!("{stem}.{TMP_EXT}"));
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&lock_path);
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Path of this process's spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes held (the size of the spool file).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether a record with this id is held.
    pub fn contains(&self, id: &str) -> bool {
        self.pending.contains_key(id)
    }

    /// Every record held, in id order (which is time order for uuid v7 ids).
    pub fn pending(&self) -> Vec<EncodedRecord> {
        self.pending.values().cloned().collect()
    }

    /// For each topic with counts records held, the start of the oldest bucket among them:
    /// those buckets are not complete on the audit topic until the records are delivered.
    pub fn oldest_counts(&self) -> BTreeMap<String, i64> {
        let mut oldest: BTreeMap<String, i64> = BTreeMap::new();
        for r in self.pending.values() {
            if let Some(start) = r.bucket_start_ms {
                match oldest.get_mut(&r.topic) {
                    Some(b) => *b = (*b).min(start),
                    None => {
                        oldest.insert(r.topic.clone(), start);
                    }
                }
            }
        }
        oldest
    }

    /// Stores records durably (written and fsync'd before returning). Records already held
    /// are skipped. Returns the ids of records that did not fit under the size bound.
    pub fn append(&mut self, records: Vec<EncodedRecord>) -> Result<Vec<String>, SpoolError> {
        let mut buf = Vec::new();
        let mut added: BTreeMap<String, EncodedRecord> = BTreeMap::new();
        let mut rejected = Vec::new();
        let mut size = self.bytes;
        for record in records {
            if self.pending.contains_key(&record.id) || added.contains_key(&record.id) {
                continue;
            }
            let l = line(&record.bytes);
            if size + l.len() as u64 > self.max_bytes {
                rejected.push(record.id);
                continue;
            }
            size += l.len() as u64;
            buf.extend_from_slice(&l);
            added.insert(record.id.clone(), record);
        }
        if !buf.is_empty() {
            self.file.write_all(&buf).map_err(io_err(&self.path))?;
            self.file.sync_data().map_err(io_err(&self.path))?;
            self.bytes = size;
            self.pending.extend(added);
        }
        Ok(rejected)
    }

    /// Forgets records (acknowledged by Kafka), durably.
    pub fn remove(&mut self, ids: &HashSet<String>) -> Result<(), SpoolError> {
        let before = self.pending.len();
        self.pending.retain(|id, _| !ids.contains(id));
        if self.pending.len() == before {
            return Ok(());
        }
        if self.pending.is_empty() {
            self.file.set_len(0).map_err(io_err(&self.path))?;
            self.file.sync_data().map_err(io_err(&self.path))?;
            self.bytes = 0;
            return Ok(());
        }
        let tmp = self.dir.join(format!("{}.{TMP_EXT}", self.stem));
        let mut buf = Vec::new();
        for record in self.pending.values() {
            buf.extend_from_slice(&line(&record.bytes));
        }
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&buf).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        self.bytes = buf.len() as u64;
        Ok(())
    }
}

impl Drop for Spool {
    /// An empty spool leaves nothing behind; one holding records stays for the next start.
    fn drop(&mut self) {
        if self.pending.is_empty() {
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_file(self.dir.join(format!("{}.{LOCK_EXT}", self.stem)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::BucketWidth;
    use crate::histogram::Latency;
    use crate::record::{Counts, Observer, Tier};

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "chaperone-spool-test-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        fs::create_dir_all(&d).expect("temp dir");
        d
    }

    const BUCKET: i64 = 1_764_067_200_000;

    fn record(n: u64) -> EncodedRecord {
        counts("orders", BUCKET, n)
    }

    fn counts(topic: &str, bucket_start_ms: i64, n: u64) -> EncodedRecord {
        let mut latency = Latency::new();
        latency.record(5);
        let r = AuditRecord::Counts(Counts {
            id: uuid::Uuid::now_v7().to_string(),
            topic: topic.into(),
            physical_topic: topic.into(),
            partition: Some(0),
            bucket_start_ms,
            bucket_width: BucketWidth::default(),
            observer: Observer {
                tier: Tier::Producer,
                datacenter: "dc".into(),
                cluster: "regional".into(),
                host: "h".into(),
                instance: "1".into(),
            },
            count: n,
            bytes: n,
            no_timestamp: 0,
            malformed: 0,
            min_event_ms: Some(bucket_start_ms),
            max_event_ms: Some(bucket_start_ms),
            latency: if n > 0 { latency } else { Latency::new() },
            emitted_at_ms: bucket_start_ms + 70_000,
        });
        EncodedRecord::new(&r)
    }

    fn ids(records: &[EncodedRecord]) -> Vec<String> {
        records.iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn append_remove_and_replay_keep_ids() {
        let dir = temp_dir("replay");
        // Buckets 1, 2, 3 minutes after BUCKET for orders, 2 and 1 for payments.
        let records = vec![
            counts("orders", BUCKET + 60_000, 1),
            counts("payments", BUCKET + 120_000, 2),
            counts("orders", BUCKET + 180_000, 3),
            counts("payments", BUCKET + 60_000, 4),
            counts("orders", BUCKET + 120_000, 5),
        ];
        let path = {
            let (mut s, report) = Spool::open(&dir, 1 << 20).expect("opens");
            assert_eq!(report, OpenReport::default());
            assert!(s.append(records.clone()).expect("appends").is_empty());
            // Appending the same ids again stores nothing twice.
            assert!(s.append(records.clone()).expect("appends").is_empty());
            assert_eq!(s.len(), 5);
            assert_eq!(
                s.oldest_counts(),
                BTreeMap::from([
                    ("orders".to_owned(), BUCKET + 60_000),
                    ("payments".to_owned(), BUCKET + 60_000)
                ])
            );
            let size = fs::metadata(s.path()).expect("meta").len();
            assert_eq!(size, s.bytes());
            let gone: HashSet<String> = ids(&records[..2]).into_iter().collect();
            s.remove(&gone).expect("removes");
            assert_eq!(s.len(), 3);
            // Delivered records no longer hold their topic back.
            assert_eq!(
                s.oldest_counts(),
                BTreeMap::from([
                    ("orders".to_owned(), BUCKET + 120_000),
                    ("payments".to_owned(), BUCKET + 60_000)
                ])
            );
            assert_eq!(fs::metadata(s.path()).expect("meta").len(), s.bytes());
            s.path().to_owned()
            // Dropped here without cleanup: like a process that exits with records pending.
        };
        let (s2, report) = Spool::open(&dir, 1 << 20).expect("reopens");
        assert_eq!(report.adopted_files, 1);
        assert_eq!(report.adopted_records, 3);
        assert!(!path.exists(), "the old file is deleted once adopted");
        // The file holds nothing but the records: the topic (the Kafka key) and the bucket
        // are read back from them, so files of earlier versions are adopted the same way.
        assert_eq!(s2.pending(), records[2..].to_vec());
        for r in s2.pending() {
            let decoded = AuditRecord::decode(&r.bytes).expect("decodes");
            assert_eq!((decoded.id(), decoded.topic()), (&*r.id, &*r.topic));
        }
        assert_eq!(
            s2.oldest_counts(),
            BTreeMap::from([
                ("orders".to_owned(), BUCKET + 120_000),
                ("payments".to_owned(), BUCKET + 60_000)
            ])
        );
        // The adopted records are durable in the new file.
        let data = fs::read(s2.path()).expect("reads");
        assert_eq!(ids(&parse_file(&data).records), ids(&records[2..]));
        let all: HashSet<String> = ids(&records).into_iter().collect();
        let mut s2 = s2;
        s2.remove(&all).expect("removes all");
        assert_eq!((s2.len(), s2.bytes()), (0, 0));
        assert_eq!(fs::metadata(s2.path()).expect("meta").len(), 0);
        drop(s2);
        assert_eq!(
            fs::read_dir(&dir).expect("lists").count(),
            0,
            "an empty spool removes its files"
        );
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_live_process_keeps_its_spool() {
        let dir = temp_dir("live");
        let (mut a, _) = Spool::open(&dir, 1 << 20).expect("opens");
        a.append(vec![record(1)]).expect("appends");
        let (b, report) = Spool::open(&dir, 1 << 20).expect("opens");
        assert_eq!(report.adopted_files, 0);
        assert!(b.is_empty());
        assert!(a.path().exists());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn torn_tail_drops_only_the_cut_line() {
        let dir = temp_dir("torn");
        let records: Vec<_> = (1..=3).map(record).collect();
        let orphan = dir.join("audit-1-dead.spool");
        let mut data = Vec::new();
        for r in &records {
            data.extend_from_slice(&line(&r.bytes));
        }
        let cut = line(&record(9).bytes);
        data.extend_from_slice(&cut[..cut.len() / 2]);
        fs::write(&orphan, &data).expect("writes");
        let (s, report) = Spool::open(&dir, 1 << 20).expect("opens");
        assert_eq!(report.torn_lines, 1);
        assert!(report.quarantined.is_empty());
        assert_eq!(ids(&s.pending()), ids(&records));
        assert!(!orphan.exists());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn corrupt_file_is_quarantined_and_its_good_records_kept() {
        let dir = temp_dir("corrupt");
        let records: Vec<_> = (1..=3).map(record).collect();
        let orphan = dir.join("audit-2-dead.spool");
        let mut data = Vec::new();
        data.extend_from_slice(&line(&records[0].bytes));
        let mut damaged = line(&records[1].bytes);
        damaged[30] ^= 0x20; // one flipped bit inside the JSON
        data.extend_from_slice(&damaged);
        data.extend_from_slice(b"not a spool line at all\n");
        data.extend_from_slice(&line(&records[2].bytes));
        fs::write(&orphan, &data).expect("writes");
        let (s, report) = Spool::open(&dir, 1 << 20).expect("opens despite corruption");
        assert_eq!(report.quarantined.len(), 1);
        assert!(report.quarantined[0].exists());
        assert!(!orphan.exists());
        assert_eq!(
            ids(&s.pending()),
            vec![records[0].id.clone(), records[2].id.clone()]
        );
        // A later start does not read the quarantined file again.
        drop(s);
        let (s3, report) = Spool::open(&dir, 1 << 20).expect("opens");
        assert_eq!(report.adopted_records, 2);
        assert!(report.quarantined.is_empty());
        assert_eq!(s3.len(), 2);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn size_is_bounded() {
        let dir = temp_dir("bounded");
        let one = line(&record(1).bytes).len() as u64;
        let (mut s, _) = Spool::open(&dir, one * 2 + 1).expect("opens");
        let records: Vec<_> = (1..=3).map(record).collect();
        let rejected = s.append(records.clone()).expect("appends");
        assert_eq!(rejected, vec![records[2].id.clone()]);
        assert_eq!(s.len(), 2);
        assert!(s.bytes() <= one * 2 + 1);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn leftover_temporary_file_of_a_crashed_rewrite_is_ignored() {
        let dir = temp_dir("tmp");
        let records: Vec<_> = (1..=2).map(record).collect();
        let mut data = Vec::new();
        for r in &records {
            data.extend_from_slice(&line(&r.bytes));
        }
        fs::write(dir.join("audit-3-dead.spool"), &data).expect("writes");
        fs::write(dir.join("audit-3-dead.spool.tmp"), &data[..10]).expect("writes");
        let (s, report) = Spool::open(&dir, 1 << 20).expect("opens");
        assert_eq!(report.adopted_records, 2);
        assert_eq!(s.len(), 2);
        assert!(!dir.join("audit-3-dead.spool.tmp").exists());
        fs::remove_dir_all(&dir).ok();
    }
}
