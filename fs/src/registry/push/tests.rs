//! The pure parts of pushes: chunks, ranges, upload URLs.

use super::*;

#[test]
fn a_blob_is_cut_into_whole_chunks_and_a_short_last_one() {
    assert_eq!(chunks(0, 10), Vec::<Range<u64>>::new());
    assert_eq!(chunks(10, 10), vec![0..10]);
    assert_eq!(chunks(25, 10), vec![0..10, 10..20, 20..25]);
}

#[test]
fn content_range_is_inclusive() {
    assert_eq!(content_range(&(0..10)), "0-9");
    assert_eq!(content_range(&(10..20)), "10-19");
}

#[test]
fn upload_urls_join_relative_locations_and_carry_the_digest() {
    let base = Url::parse("http://127.0.0.1:5000/v2/a/blobs/uploads/").unwrap();
    let d = Digest::of(b"x");
    let u = upload_url(&base, "/v2/a/blobs/uploads/abc?_state=s", Some(&d)).unwrap();
    assert_eq!(u.host_str(), Some("127.0.0.1"));
    assert_eq!(u.port(), Some(5000));
    assert_eq!(u.path(), "/v2/a/blobs/uploads/abc");
    let q: Vec<_> = u.query_pairs().collect();
    assert_eq!(q.len(), 2);
    assert_eq!(q[1].1, d.to_string());
    let abs = upload_url(&base, "https://other/up/1", None).unwrap();
    assert_eq!(abs.as_str(), "https://other/up/1");
}
