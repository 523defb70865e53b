//! This mount namespace's mounts, as `/proc/self/mountinfo` lists them:
//! how the daemon finds what a predecessor left mounted without touching
//! it (a FUSE mount nobody serves would hang whoever stats it).

use std::path::PathBuf;

/// One line of mountinfo, the fields tarn looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    /// `fuse`, `fuse.tarn-disk`, `ext4`, ...
    pub fstype: String,
    /// The mount's source: a FUSE mount's fsname, a block device's path.
    pub source: String,
}

/// Every mount of this namespace; none if mountinfo cannot be read.
pub fn read() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse(&text))
        .unwrap_or_default()
}

/// mountinfo's lines (proc(5)): the mountpoint is the 5th field; after the
/// optional fields and a lone `-` come the type and the source.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let (fstype, source) = (right.next()?, right.next()?);
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_owned(),
                source: unescape(source),
            })
        })
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/var/lib/a\040b/fs"), "/var/lib/a b/fs");
        assert_eq!(unescape(r"/x\\y"), r"/x\\y");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn lines_give_mountpoint_type_and_source() {
        let text = "\
36 25 0:32 / /r/layers/ab/fs ro,nosuid,nodev,relatime shared:1 - fuse tarn:sha256:ab ro,user_id=0
37 25 0:33 / /r/layers/cd/disk ro,nosuid,nodev,noexec - fuse.tarn-disk tarn-obd-cd ro
38 25 7:3 / /r/layers/cd/a\\040b ro,nosuid,nodev - ext4 /dev/loop3 ro,noload
garbage
";
        let got = parse(text);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].mountpoint, PathBuf::from("/r/layers/ab/fs"));
        assert_eq!(got[0].source, "tarn:sha256:ab");
        assert_eq!(got[1].fstype, "fuse.tarn-disk");
        assert_eq!(got[2].mountpoint, PathBuf::from("/r/layers/cd/a b"));
        assert_eq!(
            (got[2].fstype.as_str(), got[2].source.as_str()),
            ("ext4", "/dev/loop3")
        );
    }
}
