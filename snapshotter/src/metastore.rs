//! The persisted snapshot state machine, in redb.
//!
//! Every snapshot is a [`Record`] under its key. The kind of a snapshot and
//! every legal transition live here and nowhere else:
//!
//! - `create` makes an Active or View snapshot whose parent, if any, is
//!   Committed;
//! - `commit` turns an Active snapshot into a Committed one under a new name,
//!   keeping its id (and so its directory); `rebase` before it gives a
//!   parentless Active snapshot its parent (containerd 2.x's parallel
//!   unpack);
//! - `remove` refuses a snapshot that still has children.
//!
//! Every change runs in [`MetaStore::update`], which commits the redb write
//! transaction when the closure succeeds and rolls it back otherwise, so the
//! caller can do filesystem work (renaming a prepared directory into place)
//! inside the same all-or-nothing step.
//!
//! Errors a client can cause are one of four sentinels ([`Error::NotFound`],
//! [`Error::AlreadyExists`], [`Error::FailedPrecondition`],
//! [`Error::InvalidArgument`]); the service maps them to gRPC codes.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::SystemTime;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Key -> JSON-encoded [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// (parent key, child key) -> (): the children of each snapshot.
const CHILDREN: TableDefinition<(&str, &str), ()> = TableDefinition::new("children");
/// Counters; `next_id` hands out snapshot ids, never reused.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// containerd refuses a label whose key and value together exceed this
/// (labels.Validate); we refuse the same so behaviour does not depend on
/// which side checks.
const MAX_LABEL_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("metadata store")]
    Store(#[from] redb::Error),
    #[error("metadata record of {key:?} is corrupt")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

macro_rules! redb_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.into())
            }
        }
    )*};
}
redb_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What is stored per snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory; stays the same across Commit.
    pub id: u64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Disk usage recorded at Commit; zero for Active and View.
    #[serde(default)]
    pub usage: Usage,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// The public description of a snapshot (containerd's `snapshots.Info`).
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub name: String,
    pub parent: Option<String>,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

impl Info {
    fn new(name: &str, r: &Record) -> Self {
        Info {
            name: name.to_owned(),
            parent: r.parent.clone(),
            kind: r.kind,
            labels: r.labels.clone(),
            created: r.created,
            updated: r.updated,
        }
    }
}

/// An Active or View snapshot with its ancestors, nearest first:
/// everything needed to compute its mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: u64,
    pub kind: Kind,
    /// Its own labels (the store does not read them either).
    pub labels: BTreeMap<String, String>,
    pub parents: Vec<Parent>,
}

/// One ancestor of a [`Snapshot`]: its id, and its labels, which say
/// whether its content is elsewhere (a remote layer's mount); the store
/// does not read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub id: u64,
    pub labels: BTreeMap<String, String>,
}

pub struct MetaStore {
    db: redb::Database,
}

impl MetaStore {
    /// Opens (or creates) the store and its tables.
    pub fn open(path: &Path) -> Result<Self> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(CHILDREN)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(MetaStore { db })
    }

    /// Runs `f` in one write transaction: committed if `f` returns `Ok`,
    /// rolled back (dropped) otherwise. Blocking.
    /// The closure may fail with any error that a store error converts
    /// into, so filesystem steps done inside it roll the transaction back too.
    pub fn update<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let wtx = self.db.begin_write().map_err(Error::from)?;
        let value = {
            let mut tx = Tx {
                snapshots: wtx.open_table(SNAPSHOTS).map_err(Error::from)?,
                children: wtx.open_table(CHILDREN).map_err(Error::from)?,
                meta: wtx.open_table(META).map_err(Error::from)?,
            };
            f(&mut tx)?
        };
        wtx.commit().map_err(Error::from)?;
        Ok(value)
    }

    /// Info and recorded usage of `key`, with its id. Blocking.
    pub fn get(&self, key: &str) -> Result<(Record, Info)> {
        let rtx = self.db.begin_read()?;
        let table = rtx.open_table(SNAPSHOTS)?;
        let r = get_record(&table, key)?.ok_or_else(|| not_found(key))?;
        let info = Info::new(key, &r);
        Ok((r, info))
    }

    /// An Active or View snapshot with its ancestry, for Mounts. Blocking.
    pub fn snapshot(&self, key: &str) -> Result<Snapshot> {
        let rtx = self.db.begin_read()?;
        let table = rtx.open_table(SNAPSHOTS)?;
        let r = get_record(&table, key)?.ok_or_else(|| not_found(key))?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed, not active or view"
            )));
        }
        build_snapshot(&table, &r)
    }

    /// Every snapshot, in key order. Blocking.
    pub fn list(&self) -> Result<Vec<Info>> {
        let rtx = self.db.begin_read()?;
        let table = rtx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let r = decode(k.value(), v.value())?;
            out.push(Info::new(k.value(), &r));
        }
        Ok(out)
    }

    /// Ids of every snapshot (whose directories must be kept). Blocking.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        let rtx = self.db.begin_read()?;
        let table = rtx.open_table(SNAPSHOTS)?;
        collect_ids(&table)
    }
}

/// The tables of one write transaction, with the transitions.
pub struct Tx<'a> {
    snapshots: redb::Table<'a, &'static str, &'static [u8]>,
    children: redb::Table<'a, (&'static str, &'static str), ()>,
    meta: redb::Table<'a, &'static str, u64>,
}

impl Tx<'_> {
    /// Creates an Active or View snapshot `key` on `parent`.
    pub fn create(
        &mut self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "snapshot kind must be active or view".into(),
            ));
        }
        let r = self.insert_new(kind, "key", key, parent, labels)?;
        build_snapshot(&self.snapshots, &r)
    }

    /// Commits Active `key` as `name`, recording `usage`. The committed
    /// snapshot keeps the id (directory) and parent of the active one.
    pub fn commit(
        &mut self,
        key: &str,
        name: &str,
        usage: Usage,
        labels: BTreeMap<String, String>,
    ) -> Result<u64> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        let labels = validate_labels(labels)?;
        if get_record(&self.snapshots, name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let r = get_record(&self.snapshots, key)?.ok_or_else(|| not_found(key))?;
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is {}, not active",
                r.kind.as_str()
            )));
        }
        if let Some(parent) = &r.parent {
            self.children.remove((parent.as_str(), key))?;
            self.children.insert((parent.as_str(), name), ())?;
        }
        self.snapshots.remove(key)?;
        let now = SystemTime::now();
        let committed = Record {
            id: r.id,
            kind: Kind::Committed,
            parent: r.parent,
            labels,
            created: now,
            updated: now,
            usage,
        };
        self.put(name, &committed)?;
        Ok(committed.id)
    }

    /// Gives Active `key`, prepared without a parent, its parent: containerd
    /// 2.x's parallel unpack prepares every layer parentless and names the
    /// parent only at Commit ("rebase"). Metadata only: the snapshot's
    /// directory holds its own changes whatever it sits on. Re-stating the
    /// parent it has is allowed; moving it to another is refused.
    pub fn rebase(&mut self, key: &str, parent: &str) -> Result<()> {
        let mut r = get_record(&self.snapshots, key)?.ok_or_else(|| not_found(key))?;
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is {}, not active",
                r.kind.as_str()
            )));
        }
        match r.parent.as_deref() {
            Some(p) if p == parent => return Ok(()),
            Some(p) => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has parent {p:?}: cannot commit it on {parent:?}"
                )));
            }
            None => {}
        }
        let p = get_record(&self.snapshots, parent)?
            .ok_or_else(|| Error::NotFound(format!("parent snapshot {parent:?} not found")))?;
        if p.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        self.children.insert((parent, key), ())?;
        r.parent = Some(parent.to_owned());
        self.put(key, &r)
    }

    /// Creates the Committed snapshot `name` on `parent` directly, without
    /// an Active one before it: a remote layer, whose content is a FUSE
    /// mount and which has no directory of its own. Returns its id.
    pub fn create_committed(
        &mut self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<u64> {
        let r = self.insert_new(Kind::Committed, "name", name, parent, labels)?;
        Ok(r.id)
    }

    /// What `create` and `create_committed` share: checks that `key` (a
    /// snapshot `noun`, for messages) is new and not empty, that its labels
    /// fit and that `parent`, if any, exists and is committed; then records
    /// a new snapshot of `kind` with a fresh id.
    fn insert_new(
        &mut self,
        kind: Kind,
        noun: &str,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Record> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "snapshot {noun} must not be empty"
            )));
        }
        let labels = validate_labels(labels)?;
        if get_record(&self.snapshots, key)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {key:?} already exists"
            )));
        }
        if let Some(parent) = parent {
            let p = get_record(&self.snapshots, parent)?
                .ok_or_else(|| Error::NotFound(format!("parent snapshot {parent:?} not found")))?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent:?} is not a committed snapshot"
                )));
            }
            self.children.insert((parent, key), ())?;
        }
        let now = SystemTime::now();
        let r = Record {
            id: self.next_id()?,
            kind,
            parent: parent.map(str::to_owned),
            labels,
            created: now,
            updated: now,
            usage: Usage::default(),
        };
        self.put(key, &r)?;
        Ok(r)
    }

    /// Removes `key`, refused while it has children. Returns its record.
    pub fn remove(&mut self, key: &str) -> Result<Record> {
        let r = get_record(&self.snapshots, key)?.ok_or_else(|| not_found(key))?;
        let has_children = self
            .children
            .range((key, "")..)?
            .next()
            .transpose()?
            .is_some_and(|(k, _)| k.value().0 == key);
        if has_children {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?} with children"
            )));
        }
        if let Some(parent) = &r.parent {
            self.children.remove((parent.as_str(), key))?;
        }
        self.snapshots.remove(key)?;
        Ok(r)
    }

    /// Updates the mutable fields (labels) of `info.name` as containerd's
    /// storage does: no field paths replace all labels; `labels` replaces
    /// them; `labels.KEY` sets one. An empty value removes the label.
    pub fn update_info(&mut self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        let key = info.name.as_str();
        let mut r = get_record(&self.snapshots, key)?.ok_or_else(|| not_found(key))?;
        let mut labels = r.labels.clone();
        if fieldpaths.is_empty() {
            labels = info.labels.clone();
        }
        for path in fieldpaths {
            if let Some(label) = path.strip_prefix("labels.") {
                match info.labels.get(label) {
                    Some(v) => labels.insert(label.to_owned(), v.clone()),
                    None => labels.remove(label),
                };
            } else if path == "labels" {
                labels = info.labels.clone();
            } else {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {path:?} field on snapshot {key:?}"
                )));
            }
        }
        r.labels = validate_labels(labels)?;
        r.updated = SystemTime::now();
        self.put(key, &r)?;
        Ok(Info::new(key, &r))
    }

    /// Ids of every snapshot as this transaction sees them.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        collect_ids(&self.snapshots)
    }

    fn put(&mut self, key: &str, r: &Record) -> Result<()> {
        let bytes = serde_json::to_vec(r).map_err(|source| Error::Corrupt {
            key: key.to_owned(),
            source,
        })?;
        self.snapshots.insert(key, bytes.as_slice())?;
        Ok(())
    }

    fn next_id(&mut self) -> Result<u64> {
        let id = self.meta.get(NEXT_ID)?.map_or(1, |v| v.value());
        self.meta.insert(NEXT_ID, id + 1)?;
        Ok(id)
    }
}

fn not_found(key: &str) -> Error {
    Error::NotFound(format!("snapshot {key:?} not found"))
}

/// Drops labels with empty values (containerd stores none) and refuses
/// oversized ones.
fn validate_labels(labels: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "label key and value longer than {MAX_LABEL_SIZE} bytes: {k:?}"
            )));
        }
        if !v.is_empty() {
            out.insert(k, v);
        }
    }
    Ok(out)
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
        key: key.to_owned(),
        source,
    })
}

fn get_record<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    key: &str,
) -> Result<Option<Record>> {
    match table.get(key)? {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

fn build_snapshot<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    r: &Record,
) -> Result<Snapshot> {
    let mut parents = Vec::new();
    let mut next = r.parent.clone();
    while let Some(p) = next {
        let pr = get_record(table, &p)?
            .ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?} not found")))?;
        parents.push(Parent {
            id: pr.id,
            labels: pr.labels,
        });
        next = pr.parent;
    }
    Ok(Snapshot {
        id: r.id,
        kind: r.kind,
        labels: r.labels.clone(),
        parents,
    })
}

fn collect_ids<T: ReadableTable<&'static str, &'static [u8]>>(table: &T) -> Result<HashSet<u64>> {
    let mut ids = HashSet::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        ids.insert(decode(k.value(), v.value())?.id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let ms = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        (dir, ms)
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn create_commit_and_stack() {
        let (_d, ms) = store();
        let s = ms
            .update(|tx| tx.create(Kind::Active, "a", None, BTreeMap::new()))
            .unwrap();
        assert!(s.parents.is_empty());
        let id = ms
            .update(|tx| {
                tx.commit(
                    "a",
                    "c1",
                    Usage {
                        size: 10,
                        inodes: 2,
                    },
                    labels(&[("x", "1")]),
                )
            })
            .unwrap();
        assert_eq!(id, s.id, "commit keeps the directory id");
        assert!(matches!(ms.get("a"), Err(Error::NotFound(_))));
        let (r, info) = ms.get("c1").unwrap();
        assert_eq!(info.kind, Kind::Committed);
        assert_eq!(r.usage.size, 10);
        assert_eq!(info.labels, labels(&[("x", "1")]));

        let s2 = ms
            .update(|tx| tx.create(Kind::View, "v", Some("c1"), BTreeMap::new()))
            .unwrap();
        assert_eq!(s2.parents.iter().map(|p| p.id).collect::<Vec<_>>(), [s.id]);
        assert_eq!(s2.parents[0].labels, labels(&[("x", "1")]));
        assert_eq!(ms.snapshot("v").unwrap(), s2);
        assert!(matches!(
            ms.snapshot("c1"),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn illegal_transitions_are_sentinels_and_roll_back() {
        let (_d, ms) = store();
        ms.update(|tx| tx.create(Kind::Active, "a", None, BTreeMap::new()))
            .unwrap();
        let e = ms.update(|tx| tx.create(Kind::Active, "a", None, BTreeMap::new()));
        assert!(matches!(e, Err(Error::AlreadyExists(_))));
        let e = ms.update(|tx| tx.create(Kind::Active, "b", Some("missing"), BTreeMap::new()));
        assert!(matches!(e, Err(Error::NotFound(_))));
        let e = ms.update(|tx| tx.create(Kind::Active, "b", Some("a"), BTreeMap::new()));
        assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");
        let e = ms.update(|tx| tx.create(Kind::Committed, "b", None, BTreeMap::new()));
        assert!(matches!(e, Err(Error::InvalidArgument(_))));

        ms.update(|tx| tx.create(Kind::View, "v", None, BTreeMap::new()))
            .unwrap();
        let e = ms.update(|tx| tx.commit("v", "c", Usage::default(), BTreeMap::new()));
        assert!(matches!(e, Err(Error::FailedPrecondition(_))));
        let e = ms.update(|tx| tx.commit("a", "v", Usage::default(), BTreeMap::new()));
        assert!(matches!(e, Err(Error::AlreadyExists(_))));

        // A failing closure leaves nothing behind.
        let e: Result<()> = ms.update(|tx| {
            tx.create(Kind::Active, "rolled-back", None, BTreeMap::new())?;
            Err(Error::InvalidArgument("boom".into()))
        });
        assert!(e.is_err());
        assert!(matches!(ms.get("rolled-back"), Err(Error::NotFound(_))));
    }

    #[test]
    fn create_and_create_committed_refuse_alike() {
        let (_d, ms) = store();
        ms.update(|tx| {
            tx.create(Kind::Active, "a", None, BTreeMap::new())?;
            tx.commit("a", "base", Usage::default(), BTreeMap::new())?;
            tx.create(Kind::Active, "active", None, BTreeMap::new())
        })
        .unwrap();
        let big = labels(&[("k", &"v".repeat(MAX_LABEL_SIZE))]);
        type Make = fn(&mut Tx<'_>, &str, Option<&str>, BTreeMap<String, String>) -> Result<()>;
        let makers: [(&str, Make); 2] = [
            ("create", |tx, k, p, l| {
                tx.create(Kind::View, k, p, l).map(drop)
            }),
            ("create_committed", |tx, k, p, l| {
                tx.create_committed(k, p, l).map(drop)
            }),
        ];
        for (what, make) in makers {
            let e = ms.update(|tx| make(tx, "", None, BTreeMap::new()));
            assert!(matches!(e, Err(Error::InvalidArgument(_))), "{what}: empty");
            let e = ms.update(|tx| make(tx, "base", None, BTreeMap::new()));
            assert!(matches!(e, Err(Error::AlreadyExists(_))), "{what}: taken");
            let e = ms.update(|tx| make(tx, "n", Some("missing"), BTreeMap::new()));
            assert!(matches!(e, Err(Error::NotFound(_))), "{what}: no parent");
            let e = ms.update(|tx| make(tx, "n", Some("active"), BTreeMap::new()));
            assert!(
                matches!(e, Err(Error::InvalidArgument(_))),
                "{what}: active parent"
            );
            let e = ms.update(|tx| make(tx, "n", None, big.clone()));
            assert!(
                matches!(e, Err(Error::InvalidArgument(_))),
                "{what}: label size"
            );
            assert!(matches!(ms.get("n"), Err(Error::NotFound(_))), "{what}");
            ms.update(|tx| make(tx, "n", Some("base"), labels(&[("e", "")])))
                .unwrap();
            let info = ms.get("n").unwrap().1;
            assert_eq!(info.parent.as_deref(), Some("base"), "{what}");
            assert!(info.labels.is_empty(), "{what}: empty labels dropped");
            assert!(
                matches!(
                    ms.update(|tx| tx.remove("base")),
                    Err(Error::FailedPrecondition(_))
                ),
                "{what}: recorded as a child"
            );
            ms.update(|tx| tx.remove("n")).unwrap();
        }
    }

    #[test]
    fn remove_refused_with_children() {
        let (_d, ms) = store();
        ms.update(|tx| {
            tx.create(Kind::Active, "a", None, BTreeMap::new())?;
            tx.commit("a", "base", Usage::default(), BTreeMap::new())?;
            tx.create(Kind::Active, "child", Some("base"), BTreeMap::new())?;
            tx.create(Kind::Active, "base2", None, BTreeMap::new())
        })
        .unwrap();
        let e = ms.update(|tx| tx.remove("base"));
        assert!(matches!(e, Err(Error::FailedPrecondition(_))));
        // A key sorting right after "base" is not its child.
        ms.update(|tx| tx.remove("base2")).unwrap();
        ms.update(|tx| tx.commit("child", "c2", Usage::default(), BTreeMap::new()))
            .unwrap();
        assert!(matches!(
            ms.update(|tx| tx.remove("base")),
            Err(Error::FailedPrecondition(_))
        ));
        ms.update(|tx| tx.remove("c2")).unwrap();
        ms.update(|tx| tx.remove("base")).unwrap();
        assert!(ms.list().unwrap().is_empty());
        assert!(matches!(
            ms.update(|tx| tx.remove("base")),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn update_labels_with_fieldpaths() {
        let (_d, ms) = store();
        ms.update(|tx| tx.create(Kind::Active, "a", None, labels(&[("a", "1"), ("b", "2")])))
            .unwrap();
        let mut info = ms.get("a").unwrap().1;
        info.labels = labels(&[("b", "20"), ("c", "3")]);
        let got = ms
            .update(|tx| tx.update_info(&info, &["labels.b".into(), "labels.a".into()]))
            .unwrap();
        assert_eq!(got.labels, labels(&[("b", "20")]), "a removed, c untouched");
        let got = ms.update(|tx| tx.update_info(&info, &[])).unwrap();
        assert_eq!(got.labels, labels(&[("b", "20"), ("c", "3")]));
        let got = ms
            .update(|tx| tx.update_info(&info, &["labels".into()]))
            .unwrap();
        assert_eq!(got.labels, info.labels);
        let e = ms.update(|tx| tx.update_info(&info, &["kind".into()]));
        assert!(matches!(e, Err(Error::InvalidArgument(_))));
        assert!(got.updated >= got.created);
    }

    #[test]
    fn ids_are_never_reused_and_state_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let first = {
            let ms = MetaStore::open(&path).unwrap();
            let s = ms
                .update(|tx| tx.create(Kind::Active, "a", None, BTreeMap::new()))
                .unwrap();
            ms.update(|tx| tx.remove("a")).unwrap();
            ms.update(|tx| tx.create(Kind::Active, "b", None, BTreeMap::new()))
                .unwrap();
            s.id
        };
        let ms = MetaStore::open(&path).unwrap();
        assert_eq!(ms.list().unwrap().len(), 1);
        let s = ms
            .update(|tx| tx.create(Kind::Active, "c", None, BTreeMap::new()))
            .unwrap();
        assert!(s.id > first + 1);
        assert_eq!(ms.ids().unwrap().len(), 2);
    }
}
