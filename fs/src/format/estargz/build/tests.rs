//! The builder against hostile TOCs: deep names, names that are not names,
//! overlay's own xattrs, and TOCs larger than the layer's budget.

use std::io::Write as _;

use flate2::{Compression, write::GzEncoder};

use super::*;
use crate::format::estargz::names::{NAME_MAX, PATH_MAX};
use crate::format::estargz::toc::{decode_toc_within, parse_toc_json};

fn d(s: &str) -> String {
    Digest::of(s.as_bytes()).to_string()
}

fn toc(entries: &[String]) -> String {
    format!(r#"{{"version":1,"entries":[{}]}}"#, entries.join(","))
}

fn fifo(name: &str) -> String {
    format!(
        r#"{{"name":{},"type":"fifo"}}"#,
        serde_json::to_string(name).unwrap()
    )
}

/// Builds as a layer's opening does: streamed, within `budget`.
fn build_json(json: &str, budget: IndexBudget) -> Result<LayerIndex, FormatError> {
    let json = TocJson {
        json: json.as_bytes().to_vec(),
        digest: Digest::of(json.as_bytes()),
    };
    build_index_from_json(json, 2000, 1000, budget)
}

fn build(entries: &[String]) -> Result<LayerIndex, FormatError> {
    build_json(&toc(entries), IndexBudget::default())
}

#[track_caller]
fn refused(entries: &[String], want: &str) -> String {
    match build(entries) {
        Ok(_) => panic!("accepted: {entries:?}"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains(want), "want {want:?} in: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
            e
        }
    }
}

/// Runs `f` on a thread with a small stack: what a recursion over the
/// input would overflow.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .expect("no stack overflow, no panic")
}

#[test]
fn deep_implicit_parents_do_not_recurse() {
    // The deepest path the kernel could look up: 2047 implicit parents.
    let deep = vec!["a"; PATH_MAX / 2 - 1].join("/");
    assert_eq!(deep.len(), PATH_MAX - 3);
    let (idx, deep) = on_small_stack(move || (build(&[fifo(&deep)]), deep));
    let idx = idx.unwrap();
    assert_eq!(idx.inode_count(), 1 + PATH_MAX as u64 / 2 - 1);
    let leaf = idx.resolve(&deep).expect("the leaf resolves");
    assert_eq!(idx.inode(leaf).unwrap().kind(), FileKind::Fifo);

    // 10,000 components: refused, by name, on the same small stack.
    let deeper = vec!["a"; 10_000].join("/");
    let e = on_small_stack(move || build(&[fifo(&deeper)]).unwrap_err().to_string());
    assert!(e.contains("longer than PATH_MAX (4096)"), "{e}");
    assert!(e.contains("\"a/a/a/a/"), "names the entry: {e}");
    assert!(e.len() < 300, "the name is cut: {e}");
}

#[test]
fn names_that_are_not_names_are_refused() {
    refused(&[fifo(".wh..")], r#"".wh..": whiteout of ".""#);
    refused(&[fifo("d/.wh...")], r#""d/.wh...": whiteout of "..""#);
    refused(&[fifo(".wh.")], "whiteout of an empty name");
    refused(&[fifo("a\0b")], r#""a\0b": a name with a NUL byte"#);
    refused(&[fifo("a/b\0/c")], "a name with a NUL byte");
    let long = "x".repeat(NAME_MAX + 1);
    refused(
        &[fifo(&format!("d/{long}"))],
        "a component of 256 bytes is longer than NAME_MAX (255)",
    );
    refused(&[fifo("a/../../x")], "escapes the layer");
    refused(&[fifo("//")], "empty name");
    // Hardlink targets are paths in the layer: the same checks.
    let link = |target: &str| {
        format!(
            r#"{{"name":"l","type":"hardlink","linkName":{}}}"#,
            serde_json::to_string(target).unwrap()
        )
    };
    refused(&[fifo("t"), link("t\0")], "NUL byte");
    refused(&[fifo("t"), link("../t")], "escapes the layer");
    refused(&[fifo("t"), link(&"y".repeat(300))], "longer than NAME_MAX");
    // Symlink targets are resolved in the container: any path symlink(2)
    // takes, nothing it refuses.
    let sym = |target: &str| {
        format!(
            r#"{{"name":"s","type":"symlink","linkName":{}}}"#,
            serde_json::to_string(target).unwrap()
        )
    };
    refused(&[sym("")], "a symlink to an empty target");
    refused(&[sym("a\0b")], "a symlink target with a NUL byte");
    refused(&[sym(&"z/".repeat(PATH_MAX / 2))], "longer than PATH_MAX");
    let idx = build(&[sym("../../etc/passwd")]).unwrap();
    let s = idx.inode(idx.resolve("s").unwrap()).unwrap();
    assert_eq!(idx.link_target(&s), b"../../etc/passwd");
    // Extended attributes as setxattr(2) takes them.
    let x = |k: &str, v: &[u8]| {
        let v = base64::engine::general_purpose::STANDARD.encode(v);
        format!(
            r#"{{"name":"x","type":"fifo","xattrs":{{{}:"{v}"}}}}"#,
            serde_json::to_string(k).unwrap()
        )
    };
    refused(&[x("", b"v")], "is empty, holds a NUL");
    refused(&[x("user.a\0b", b"v")], "is empty, holds a NUL");
    refused(
        &[x(&format!("user.{}", "k".repeat(300)), b"v")],
        "longer than 255",
    );
    refused(
        &[x("user.big", &vec![0; 65537])],
        "of 65537 bytes is larger than 65536",
    );
}

#[test]
fn legal_names_and_aufs_metadata() {
    let name = "x".repeat(NAME_MAX);
    let idx = build(&[
        fifo(&format!("./d//{name}/.")),
        fifo("d/.wh..wh.plnk"),
        fifo("d/.wh..wh.aufs"),
        fifo(".wh.gone"),
    ])
    .unwrap();
    assert!(
        idx.resolve(&format!("d/{name}")).is_some(),
        "255 bytes is a name"
    );
    let d = idx.inode(idx.resolve("d").unwrap()).unwrap();
    assert_eq!(idx.children(&d).len(), 1, "AUFS metadata is dropped");
    let gone = idx.inode(idx.resolve("gone").unwrap()).unwrap();
    assert_eq!((gone.kind(), gone.rdev()), (FileKind::CharDev, (0, 0)));
    let root = idx.inode(ROOT_INO).unwrap();
    let names: Vec<&[u8]> = idx.children(&root).map(|(n, _)| n).collect();
    assert_eq!(names, [&b"d"[..], b"gone"], "no '.', '..' or '.wh.' entry");
}

#[test]
fn overlay_private_xattrs_are_dropped_opaque_kept() {
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    let keys = [
        ("trusted.overlay.redirect", "/elsewhere"),
        ("trusted.overlay.origin", "x"),
        ("trusted.overlay.metacopy", ""),
        ("trusted.overlay.upper", "x"),
        ("trusted.overlay.impure", "y"),
        ("trusted.overlay.nlink", "U+1"),
        ("trusted.overlay.whiteout", ""),
        ("user.overlay.redirect", "/elsewhere"),
        ("user.overlay.origin", "x"),
        ("trusted.overlay.opaque", "y"),
        ("user.overlay.opaque", "y"),
        ("user.mime", "text/plain"),
        ("security.capability", "cap"),
        ("trusted.overlayx", "not overlay's"),
    ];
    let xattrs: Vec<String> = keys
        .iter()
        .map(|(k, v)| format!(r#""{k}":"{}""#, b64(v)))
        .collect();
    let entry = format!(
        r#"{{"name":"d","type":"dir","xattrs":{{{}}}}}"#,
        xattrs.join(",")
    );
    let idx = build(&[entry.clone(), entry.replace(r#""d""#, r#""e""#)]).unwrap();
    for dir in ["d", "e"] {
        let kept: Vec<&[u8]> = idx
            .xattrs(idx.resolve(dir).unwrap())
            .iter()
            .map(|(k, _)| &**k)
            .collect();
        assert_eq!(
            kept,
            [
                &b"security.capability"[..],
                b"trusted.overlay.opaque",
                b"trusted.overlayx",
                b"user.mime",
                b"user.overlay.opaque",
            ],
            "{dir}"
        );
    }
}

/// A TOC of `n` entries: a directory per 20, regular files in them.
fn many(n: usize) -> String {
    let dg = d("x");
    let entries: Vec<String> = (0..n)
        .map(|i| {
            if i % 20 == 0 {
                format!(r#"{{"name":"dir{}/","type":"dir","mode":493}}"#, i / 20)
            } else {
                format!(
                    r#"{{"name":"dir{}/file{i}","type":"reg","size":10,"offset":{},"digest":"{dg}"}}"#,
                    i / 20,
                    i % 900
                )
            }
        })
        .collect();
    toc(&entries)
}

#[test]
fn a_toc_over_the_budget_is_refused_while_it_is_decoded() {
    let json = many(20_000);
    let idx = build_json(&json, IndexBudget::default()).unwrap();
    assert_eq!(idx.inode_count(), 20_001);
    // Room for the JSON and 1 MiB more: not for 20,000 entries.
    let small = IndexBudget::new(((json.len() as u64 >> 20) + 2) << 20);
    let e = build_json(&json, small).unwrap_err();
    let msg = e.to_string();
    let FormatError::IndexBudget { limit, entries } = e else {
        panic!("want a budget refusal, got {msg}");
    };
    assert_eq!(limit, small.limit);
    assert!(entries > 0 && entries < 20_000, "refused midway: {entries}");
    let mib = format!("budget of {} MiB", small.limit >> 20);
    assert!(msg.contains(&mib) && msg.contains("max_index_mb"), "{msg}");
    // A JSON larger than the budget by itself: refused before any entry.
    let e = build_json(&json, IndexBudget::new(json.len() as u64 / 2)).unwrap_err();
    assert!(
        matches!(e, FormatError::IndexBudget { entries: 0, .. }),
        "{e}"
    );
}

#[test]
fn entries_are_built_as_they_are_decoded() {
    // The second entry escapes, the JSON breaks after it: the escape is
    // what is reported, so the builder saw it before the end was parsed.
    let json = format!(
        r#"{{"version":1,"entries":[{},{},{{"name":"#,
        fifo("a"),
        fifo("../b")
    );
    let e = build_json(&json, IndexBudget::default()).unwrap_err();
    assert!(e.to_string().contains("escapes the layer"), "{e}");
    // A version other than 1, first: refused before the entries.
    let e = build_json(
        r#"{"version":2,"entries":[{"name":"../x","type":"fifo"}]}"#,
        IndexBudget::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("unsupported TOC version 2"), "{e}");
    // Keys in any order; unknown keys skipped; both keys required.
    let ok = format!(r#"{{"x":[1,{{}}],"entries":[{}],"version":1}}"#, fifo("a"));
    assert!(build_json(&ok, IndexBudget::default()).is_ok());
    for bad in [
        r#"{"version":1}"#,
        r#"{"entries":[]}"#,
        r#"{"version":1,"entries":[],"entries":[]}"#,
    ] {
        let e = build_json(bad, IndexBudget::default()).unwrap_err();
        assert!(e.to_string().contains("decoding TOC JSON"), "{bad}: {e}");
    }
    // The list form (tools) sees the same TOC.
    assert_eq!(parse_toc_json(ok.as_bytes()).unwrap().entries.len(), 1);
}

#[test]
fn a_toc_member_inflates_no_further_than_its_bound() {
    // A GNU long-name header of 64 MiB of zeros (a few KiB compressed)
    // before the TOC entry: reading stops at the bound, it does not
    // allocate what the header claims.
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(64 << 20);
    h.set_cksum();
    gz.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        gz.write_all(&zeros).unwrap();
    }
    let member = gz.finish().unwrap();
    assert!(member.len() < 1 << 20);
    let e = decode_toc_within(&member[..], 1 << 20, |_| unreachable!()).unwrap_err();
    assert!(e.to_string().contains("reading TOC member"), "{e}");
}
