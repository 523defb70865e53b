//! The block request peers send each other (see the module doc of
//! [`crate::peer`]): built by the asker, parsed and checked by the owner.
//! Pure.

use std::ops::Range;

use crate::Digest;
use crate::registry::{Reference, Repository};

/// The unit of ownership among peers: a blob's aligned block of 128 KiB
/// (its last one shorter); a request asks for a block or a part of one
/// (`from`/`to`), and an owner fetches what is asked. When owners fetched
/// whole blocks, `make bench` S7 (four nodes, RTT 100 ms) measured 1.90x
/// one node's lazy bytes with 1 MiB blocks, 1.25x with 256 KiB and 1.02x
/// with 128 KiB (and 1.44x at 128 KiB once Python's imports came as many
/// small reads; parts: 1.00x). A read of the largest read-ahead (8 MiB) is
/// 64 blocks, asked at once.
pub const BLOCK: u64 = 128 << 10;

/// The largest blob a block may be asked of: 64 GiB.
pub const MAX_BLOB_SIZE: u64 = 64 << 30;

/// The longest query string an owner reads.
const MAX_QUERY: usize = 1024;

/// The path every block request starts with.
const PREFIX: &str = "/v1/blocks/";

/// Why a block request is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("not a block path: want /v1/blocks/<digest>/<index>")]
    Path,
    #[error("digest is not sha256:<64 lowercase hex digits>")]
    Digest,
    #[error("index is not a number")]
    Index,
    #[error("query: {0}")]
    Query(&'static str),
    #[error("size {0} is 0 or over {MAX_BLOB_SIZE}")]
    Size(u64),
    #[error("block {index} is past the end of a blob of {size} bytes")]
    PastEnd { index: u64, size: u64 },
    #[error("repo is not host/name as an image reference names it")]
    Repo,
    #[error("bytes {from}..{to} are not a part of block {index}")]
    Span { index: u64, from: u64, to: u64 },
}

/// Bytes `span` (within block `index`; the whole block unless narrowed
/// with [`BlockRequest::narrowed`]) of the blob `digest` (`size` bytes) of
/// `repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    pub repo: Repository,
    pub digest: Digest,
    pub index: u64,
    pub size: u64,
    pub span: Range<u64>,
}

impl BlockRequest {
    /// A request, checked as an owner checks it.
    pub fn new(
        repo: Repository,
        digest: Digest,
        index: u64,
        size: u64,
    ) -> Result<Self, ProtocolError> {
        if size == 0 || size > MAX_BLOB_SIZE {
            return Err(ProtocolError::Size(size));
        }
        if index >= size.div_ceil(BLOCK) {
            return Err(ProtocolError::PastEnd { index, size });
        }
        Ok(BlockRequest {
            repo,
            digest,
            index,
            size,
            span: block_range(index, size),
        })
    }

    /// The same request for bytes `from..to` of the block only: what an
    /// owner fetches and answers (a read's part of the block, so that a
    /// cluster's registry bytes are its reads', not whole blocks').
    pub fn narrowed(mut self, from: u64, to: u64) -> Result<Self, ProtocolError> {
        let block = block_range(self.index, self.size);
        if from >= to || from < block.start || to > block.end {
            return Err(ProtocolError::Span {
                index: self.index,
                from,
                to,
            });
        }
        self.span = from..to;
        Ok(self)
    }

    /// The bytes of the blob asked for.
    pub fn range(&self) -> Range<u64> {
        self.span.clone()
    }

    /// The request's path and query.
    pub fn path_and_query(&self) -> String {
        format!(
            "{PREFIX}{}/{}?repo={}&size={}&from={}&to={}",
            self.digest, self.index, self.repo, self.size, self.span.start, self.span.end
        )
    }

    /// Parses a request's path and query (as sent: no percent-encoding is
    /// taken, none is needed for what a valid request holds).
    pub fn parse(path: &str, query: Option<&str>) -> Result<Self, ProtocolError> {
        let rest = path.strip_prefix(PREFIX).ok_or(ProtocolError::Path)?;
        let (digest, index) = rest.split_once('/').ok_or(ProtocolError::Path)?;
        let digest: Digest = digest.parse().map_err(|_| ProtocolError::Digest)?;
        if index.is_empty() || index.len() > 20 || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProtocolError::Index);
        }
        let index: u64 = index.parse().map_err(|_| ProtocolError::Index)?;
        let query = query.ok_or(ProtocolError::Query("missing"))?;
        if query.len() > MAX_QUERY {
            return Err(ProtocolError::Query("too long"));
        }
        let (mut repo, mut size, mut from, mut to) = (None, None, None, None);
        for pair in query.split('&') {
            let (key, value) = pair
                .split_once('=')
                .ok_or(ProtocolError::Query("a parameter without a value"))?;
            let slot = match key {
                "repo" => &mut repo,
                "size" => &mut size,
                "from" => &mut from,
                "to" => &mut to,
                _ => return Err(ProtocolError::Query("unknown parameter")),
            };
            if slot.replace(value).is_some() {
                return Err(ProtocolError::Query("a parameter given twice"));
            }
        }
        let repo = repo.ok_or(ProtocolError::Query("no repo"))?;
        let size = number(size.ok_or(ProtocolError::Query("no size"))?)
            .ok_or(ProtocolError::Query("size is not a number"))?;
        let req = BlockRequest::new(parse_repo(repo)?, digest, index, size)?;
        match (from, to) {
            (None, None) => Ok(req),
            (Some(from), Some(to)) => {
                let from = number(from).ok_or(ProtocolError::Query("from is not a number"))?;
                let to = number(to).ok_or(ProtocolError::Query("to is not a number"))?;
                req.narrowed(from, to)
            }
            _ => Err(ProtocolError::Query("from without to, or to without from")),
        }
    }
}

/// A decimal `u64` of digits only.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `host/name`, exactly as [`Repository`]'s display writes it: no scheme,
/// tag, digest or default registry.
fn parse_repo(s: &str) -> Result<Repository, ProtocolError> {
    let r: Reference = s.parse().map_err(|_| ProtocolError::Repo)?;
    if r.digest.is_some() || r.repository.to_string() != s {
        return Err(ProtocolError::Repo);
    }
    Ok(r.repository)
}

/// The bytes block `index` of a blob of `size` bytes holds (empty past its
/// end).
pub fn block_range(index: u64, size: u64) -> Range<u64> {
    let start = index.saturating_mul(BLOCK).min(size);
    start..start.saturating_add(BLOCK).min(size)
}

/// The blocks `range` touches (`range` not empty).
pub fn blocks_of(range: &Range<u64>) -> std::ops::RangeInclusive<u64> {
    range.start / BLOCK..=(range.end.saturating_sub(1)) / BLOCK
}

/// The key a block is owned by: the blob's digest and the block's index.
pub fn block_key(digest: &Digest, index: u64) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(&digest.0);
    key[32..].copy_from_slice(&index.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> Repository {
        Repository {
            registry: "127.0.0.1:5000".into(),
            name: "multi-esgz".into(),
        }
    }

    #[test]
    fn a_request_round_trips_through_its_path() {
        let r = BlockRequest::new(repo(), Digest::of(b"blob"), 2, 3 * BLOCK + 5).unwrap();
        assert_eq!(r.range(), 2 * BLOCK..3 * BLOCK);
        let pq = r.path_and_query();
        let (path, query) = pq.split_once('?').unwrap();
        assert_eq!(BlockRequest::parse(path, Some(query)).unwrap(), r);
        let last = BlockRequest::new(repo(), Digest::of(b"blob"), 3, 3 * BLOCK + 5).unwrap();
        assert_eq!(
            last.range(),
            3 * BLOCK..3 * BLOCK + 5,
            "the last block is shorter"
        );
        // A part of a block, through its path too.
        let part = r.clone().narrowed(2 * BLOCK + 7, 2 * BLOCK + 9).unwrap();
        assert_eq!(part.range(), 2 * BLOCK + 7..2 * BLOCK + 9);
        let pq = part.path_and_query();
        let (path, query) = pq.split_once('?').unwrap();
        assert_eq!(BlockRequest::parse(path, Some(query)).unwrap(), part);
        // Nothing outside the block, nothing empty.
        for (from, to) in [
            (2 * BLOCK - 1, 2 * BLOCK + 1),
            (3 * BLOCK - 1, 3 * BLOCK + 1),
            (2 * BLOCK + 5, 2 * BLOCK + 5),
            (2 * BLOCK + 6, 2 * BLOCK + 5),
        ] {
            assert_eq!(
                r.clone().narrowed(from, to),
                Err(ProtocolError::Span { index: 2, from, to })
            );
        }
        let (path, _) = pq.split_once('?').unwrap();
        let size = 3 * BLOCK + 5;
        for (query, want) in [
            (
                format!("repo=127.0.0.1:5000/app&size={size}&from=1"),
                ProtocolError::Query("from without to, or to without from"),
            ),
            (
                format!("repo=127.0.0.1:5000/app&size={size}&from=x&to=2"),
                ProtocolError::Query("from is not a number"),
            ),
            (
                format!("repo=127.0.0.1:5000/app&size={size}&from=0&to=9"),
                ProtocolError::Span {
                    index: 2,
                    from: 0,
                    to: 9,
                },
            ),
        ] {
            assert_eq!(
                BlockRequest::parse(path, Some(&query)),
                Err(want),
                "{query}"
            );
        }
    }

    #[test]
    fn malformed_requests_are_refused() {
        let d = Digest::of(b"blob").to_string();
        let q = "repo=127.0.0.1:5000/multi-esgz&size=100";
        let one_block = format!("repo=127.0.0.1:5000/a&size={BLOCK}");
        let cases: Vec<(String, Option<&str>, ProtocolError)> = vec![
            (format!("/v2/blocks/{d}/0"), Some(q), ProtocolError::Path),
            (format!("/v1/blocks/{d}"), Some(q), ProtocolError::Path),
            (
                "/v1/blocks/sha256:xyz/0".into(),
                Some(q),
                ProtocolError::Digest,
            ),
            (format!("/v1/blocks/{d}/-1"), Some(q), ProtocolError::Index),
            (format!("/v1/blocks/{d}/1x"), Some(q), ProtocolError::Index),
            (
                format!("/v1/blocks/{d}/99999999999999999999"),
                Some(q),
                ProtocolError::Index,
            ),
            (
                format!("/v1/blocks/{d}/0"),
                None,
                ProtocolError::Query("missing"),
            ),
            (
                format!("/v1/blocks/{d}/0"),
                Some("repo=127.0.0.1:5000/a"),
                ProtocolError::Query("no size"),
            ),
            (
                format!("/v1/blocks/{d}/0"),
                Some("repo=127.0.0.1:5000/a&size=1&size=2"),
                ProtocolError::Query("a parameter given twice"),
            ),
            (
                format!("/v1/blocks/{d}/0"),
                Some("repo=127.0.0.1:5000/a&size=1&x=2"),
                ProtocolError::Query("unknown parameter"),
            ),
            (
                format!("/v1/blocks/{d}/0"),
                Some("repo=127.0.0.1:5000/a&size=0"),
                ProtocolError::Size(0),
            ),
            (
                format!("/v1/blocks/{d}/0"),
                Some("repo=127.0.0.1:5000/a&size=68719476737"),
                ProtocolError::Size(MAX_BLOB_SIZE + 1),
            ),
            (
                format!("/v1/blocks/{d}/1"),
                Some(one_block.as_str()),
                ProtocolError::PastEnd {
                    index: 1,
                    size: BLOCK,
                },
            ),
        ];
        for (path, query, want) in cases {
            assert_eq!(
                BlockRequest::parse(&path, query),
                Err(want),
                "{path}?{query:?}"
            );
        }
        for repo in [
            "http://127.0.0.1:5000/a",
            "127.0.0.1:5000/a:tag",
            "busybox",
            "library/busybox",
            "127.0.0.1:5000/A",
            "127.0.0.1:5000/a@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "",
        ] {
            let query = format!("repo={repo}&size=100");
            assert_eq!(
                BlockRequest::parse(&format!("/v1/blocks/{d}/0"), Some(&query)),
                Err(ProtocolError::Repo),
                "{repo}"
            );
        }
        let long = format!("repo={}&size=1", "a".repeat(MAX_QUERY));
        assert!(BlockRequest::parse(&format!("/v1/blocks/{d}/0"), Some(&long)).is_err());
    }

    #[test]
    fn blocks_of_a_range_and_their_keys() {
        assert_eq!(blocks_of(&(0..1)), 0..=0);
        assert_eq!(blocks_of(&(BLOCK - 1..BLOCK + 1)), 0..=1);
        assert_eq!(blocks_of(&(BLOCK..2 * BLOCK)), 1..=1);
        assert_eq!(block_range(5, 3 * BLOCK), 3 * BLOCK..3 * BLOCK);
        let d = Digest::of(b"x");
        assert_ne!(block_key(&d, 0), block_key(&d, 1));
    }
}
