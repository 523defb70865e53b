//! Where an ext4 filesystem keeps its metadata, read from its own bytes:
//! the superblock, the group descriptors, the used part of each inode
//! table and the blocks of every directory. This is what a container's
//! first lookups and stats read, one dependent block at a time; the warm
//! pass (`warm.rs`) fetches it in a few merged GETs instead.
//!
//! Pure parsing over byte slices. The disk is hostile until its blob is
//! verified: every count and offset is bounded, nothing recurses (extent
//! trees are walked by the caller with a queue and a depth that must
//! fall), and anything unexpected ends the walk with an [`Ext4Error`],
//! never a panic. Nothing here decides what is served: a wrong answer
//! only fetches the wrong blocks early.

use std::ops::Range;

/// Where the superblock starts, and its size.
pub const SUPERBLOCK: Range<u64> = 1024..2048;
const MAGIC: u16 = 0xEF53;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_INODE_UNINIT: u16 = 0x1;
const S_IFMT: u16 = 0xF000;
const S_IFDIR: u16 = 0x4000;
const S_IFREG: u16 = 0x8000;
const S_IFLNK: u16 = 0xA000;
const EXTENTS_FL: u32 = 0x8_0000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// ext4's own limit on an extent tree's depth.
pub const MAX_EXTENT_DEPTH: u16 = 5;
/// An extent longer than this is uninitialized (reads as zeros).
const MAX_INIT_EXTENT: u16 = 32768;
/// Groups walked at most: 2^20 groups of 128 MiB is 128 TiB.
const MAX_GROUPS: u64 = 1 << 20;
/// The longest symbolic link target read (the kernel's `PATH_MAX`).
pub const MAX_LINK: u64 = 4096;
/// Where an inode keeps its extent tree's root, or a short link's target.
const I_BLOCK: Range<usize> = 0x28..0x28 + 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Ext4Error {
    #[error("no ext4 superblock (magic {0:#06x})")]
    Magic(u16),
    #[error("ext4 {field} {value} is out of range")]
    Field { field: &'static str, value: u64 },
    #[error("ext4 with meta_bg is not walked (its group descriptors are scattered)")]
    MetaBg,
    #[error("ext4 extent node: {0}")]
    Extent(&'static str),
}

/// The layout facts of one filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub blocks: u64,
    pub first_data_block: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u64,
    pub inode_size: u64,
    pub desc_size: u64,
    pub groups: u64,
    /// The group descriptors count unused inode table tails
    /// (`gdt_csum` or `metadata_csum`): else every inode table is read whole.
    pub itable_unused: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn field(field: &'static str, value: u64) -> Ext4Error {
    Ext4Error::Field { field, value }
}

impl Geometry {
    /// Reads the 1024-byte superblock (the disk's bytes at [`SUPERBLOCK`]);
    /// `disk_size` bounds what it may claim.
    pub fn parse(sb: &[u8], disk_size: u64) -> Result<Geometry, Ext4Error> {
        let magic = u16_at(sb, 0x38);
        if sb.len() < 1024 || magic != MAGIC {
            return Err(Ext4Error::Magic(magic));
        }
        let log = u32_at(sb, 0x18);
        if log > 6 {
            return Err(field("log block size", log.into()));
        }
        let block_size = 1024u64 << log;
        let incompat = u32_at(sb, 0x60);
        if incompat & INCOMPAT_META_BG != 0 {
            return Err(Ext4Error::MetaBg);
        }
        let wide = incompat & INCOMPAT_64BIT != 0;
        let mut blocks = u64::from(u32_at(sb, 0x4));
        if wide {
            blocks |= u64::from(u32_at(sb, 0x150)) << 32;
        }
        if blocks == 0 || blocks > disk_size / block_size {
            return Err(field("block count", blocks));
        }
        let first_data_block = u64::from(u32_at(sb, 0x14));
        let blocks_per_group = u64::from(u32_at(sb, 0x20));
        if blocks_per_group == 0 || blocks_per_group > 8 * block_size {
            return Err(field("blocks per group", blocks_per_group));
        }
        let inodes_per_group = u64::from(u32_at(sb, 0x28));
        if inodes_per_group == 0 || inodes_per_group > 8 * block_size {
            return Err(field("inodes per group", inodes_per_group));
        }
        let inode_size = if u32_at(sb, 0x4C) == 0 {
            128
        } else {
            u64::from(u16_at(sb, 0x58))
        };
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(field("inode size", inode_size));
        }
        let desc_size = if wide {
            u64::from(u16_at(sb, 0xFE))
        } else {
            32
        };
        if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(field("group descriptor size", desc_size));
        }
        let groups = (blocks.saturating_sub(first_data_block)).div_ceil(blocks_per_group);
        if groups == 0 || groups > MAX_GROUPS {
            return Err(field("group count", groups));
        }
        let ro = u32_at(sb, 0x64);
        Ok(Geometry {
            block_size,
            blocks,
            first_data_block,
            blocks_per_group,
            inodes_per_group,
            inode_size,
            desc_size,
            groups,
            itable_unused: ro & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
        })
    }

    /// Whether files keep their blocks in extent trees (the only kind of
    /// directory this walk follows).
    pub fn extents(sb: &[u8]) -> bool {
        u32_at(sb, 0x60) & INCOMPAT_EXTENTS != 0
    }

    /// The group descriptor table's bytes on the disk.
    pub fn descriptors(&self) -> Range<u64> {
        let start = (self.first_data_block + 1) * self.block_size;
        start..start + self.groups * self.desc_size
    }

    /// The used part of each group's inode table, as byte ranges of the
    /// disk with the number of the group's first inode, read from the
    /// group descriptor table `gdt` (the bytes at [`Geometry::descriptors`]).
    /// A table that does not fit the filesystem ends the walk.
    pub fn inode_tables(&self, gdt: &[u8]) -> Result<Vec<InodeTable>, Ext4Error> {
        let mut out = Vec::new();
        let table_blocks = (self.inodes_per_group * self.inode_size).div_ceil(self.block_size);
        for (g, d) in (0u64..).zip(gdt.chunks_exact(usize::try_from(self.desc_size).unwrap_or(32)))
        {
            if g >= self.groups {
                break;
            }
            if u16_at(d, 0x12) & BG_INODE_UNINIT != 0 {
                continue;
            }
            let mut table = u64::from(u32_at(d, 0x8));
            let mut unused = u64::from(u16_at(d, 0x1C));
            if self.desc_size >= 64 {
                table |= u64::from(u32_at(d, 0x28)) << 32;
                unused |= u64::from(u16_at(d, 0x32)) << 16;
            }
            let used = if self.itable_unused {
                self.inodes_per_group.saturating_sub(unused)
            } else {
                self.inodes_per_group
            };
            if used == 0 {
                continue;
            }
            if table == 0 || table.saturating_add(table_blocks) > self.blocks {
                return Err(field("inode table block", table));
            }
            let start = table * self.block_size;
            let len = (used * self.inode_size).div_ceil(self.block_size) * self.block_size;
            out.push(InodeTable {
                bytes: start..start + len,
                first_inode: g * self.inodes_per_group + 1,
            });
        }
        Ok(out)
    }

    /// A block number as a byte range of `count` blocks, if inside the
    /// filesystem.
    fn blocks(&self, start: u64, count: u64) -> Option<Range<u64>> {
        let end = start.checked_add(count)?;
        (start > 0 && end <= self.blocks).then(|| start * self.block_size..end * self.block_size)
    }

    /// The directory blocks an inode's record names, if it is a directory
    /// whose blocks are in an extent tree: the ranges of its leaves, or the
    /// tree's next nodes to read. Anything else names nothing.
    pub fn directory(&self, inode: &[u8]) -> Result<Node, Ext4Error> {
        self.extents_of(inode, S_IFDIR)
    }

    /// The same for a regular file: where its data lies.
    pub fn regular_file(&self, inode: &[u8]) -> Result<Node, Ext4Error> {
        self.extents_of(inode, S_IFREG)
    }

    fn extents_of(&self, inode: &[u8], kind: u16) -> Result<Node, Ext4Error> {
        let mode = u16_at(inode, 0x0);
        let flags = u32_at(inode, 0x20);
        if mode & S_IFMT != kind
            || u16_at(inode, 0x1A) == 0
            || flags & EXTENTS_FL == 0
            || flags & INLINE_DATA_FL != 0
        {
            return Ok(Node::default());
        }
        let root = inode.get(I_BLOCK).ok_or(Ext4Error::Extent("short inode"))?;
        self.node(root, None)
    }

    /// Where inode `ino`'s record lies on the disk, if its group's table
    /// is among `tables` (the used ones) and it is within the used part.
    pub fn inode_at(&self, tables: &[InodeTable], ino: u64) -> Option<Range<u64>> {
        let group = ino.checked_sub(1)? / self.inodes_per_group;
        let first = group * self.inodes_per_group + 1;
        let i = tables
            .binary_search_by_key(&first, |t| t.first_inode)
            .ok()?;
        let at = tables[i].bytes.start + (ino - first) * self.inode_size;
        (at + self.inode_size <= tables[i].bytes.end).then(|| at..at + self.inode_size)
    }

    /// What a symbolic link's record says of its target: the target when
    /// the record holds it (a short link), else where its one block lies.
    /// `None` for anything that is not a link of at most [`MAX_LINK`] bytes.
    pub fn link(&self, inode: &[u8]) -> Option<LinkTarget> {
        let size = file_size(inode);
        if u16_at(inode, 0x0) & S_IFMT != S_IFLNK || u16_at(inode, 0x1A) == 0 || size > MAX_LINK {
            return None;
        }
        let flags = u32_at(inode, 0x20);
        if flags & EXTENTS_FL == 0 {
            // Short: the target is where the block map would be.
            let target = inode.get(I_BLOCK)?.get(..usize::try_from(size).ok()?)?;
            return (flags & INLINE_DATA_FL != 0 || size < 60)
                .then(|| LinkTarget::Here(target.to_vec()));
        }
        let node = self.node(inode.get(I_BLOCK)?, None).ok()?;
        let first = node.leaves.first().filter(|e| e.file == 0)?;
        Some(LinkTarget::At(first.disk.start..first.disk.start + size))
    }

    /// One extent tree node (an inode's 60-byte root, or a block of the
    /// tree); `depth` is what its parent says it must be.
    pub fn node(&self, b: &[u8], depth: Option<u16>) -> Result<Node, Ext4Error> {
        if u16_at(b, 0) != EXTENT_MAGIC {
            return Err(Ext4Error::Extent("bad magic"));
        }
        let entries = usize::from(u16_at(b, 2));
        let d = u16_at(b, 6);
        if d > MAX_EXTENT_DEPTH || depth.is_some_and(|want| want != d) {
            return Err(Ext4Error::Extent("depth out of order"));
        }
        if 12 + entries * 12 > b.len() {
            return Err(Ext4Error::Extent("more entries than fit"));
        }
        let mut node = Node::default();
        for e in b[12..12 + entries * 12].chunks_exact(12) {
            if d == 0 {
                let mut len = u16_at(e, 4);
                if len > MAX_INIT_EXTENT {
                    // Uninitialized: reads as zeros, nothing to fetch.
                    len = 0;
                }
                let start = u64::from(u32_at(e, 8)) | (u64::from(u16_at(e, 6)) << 32);
                if len > 0 {
                    let disk = self
                        .blocks(start, len.into())
                        .ok_or(Ext4Error::Extent("extent outside the filesystem"))?;
                    let file = u64::from(u32_at(e, 0)) * self.block_size;
                    node.leaves.push(Extent { file, disk });
                }
            } else {
                let child = u64::from(u32_at(e, 4)) | (u64::from(u16_at(e, 8)) << 32);
                let r = self
                    .blocks(child, 1)
                    .ok_or(Ext4Error::Extent("index outside the filesystem"))?;
                node.children.push((r, d - 1));
            }
        }
        Ok(node)
    }
}

/// The used part of one group's inode table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeTable {
    pub bytes: Range<u64>,
    pub first_inode: u64,
}

/// What one extent tree node names: data extents, and nodes below it
/// with the depth each must have.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub leaves: Vec<Extent>,
    pub children: Vec<(Range<u64>, u16)>,
}

/// Bytes of a file: where they start in it, and where they lie on the
/// disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub file: u64,
    pub disk: Range<u64>,
}

/// A symbolic link's target, or where on the disk it lies.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkTarget {
    Here(Vec<u8>),
    At(Range<u64>),
}

/// Whether an inode's record is a live directory, or a regular file.
pub fn kind_is(inode: &[u8], dir: bool) -> bool {
    let want = if dir { S_IFDIR } else { S_IFREG };
    u16_at(inode, 0x0) & S_IFMT == want && u16_at(inode, 0x1A) != 0
}

/// A file's size from its inode's record.
pub fn file_size(inode: &[u8]) -> u64 {
    u64::from(u32_at(inode, 0x4)) | (u64::from(u32_at(inode, 0x6C)) << 32)
}

/// The inode number of `name` in one block of a directory (its linear
/// entries; an indexed directory's leaves are such blocks too, and its
/// index blocks read as one empty entry). A malformed entry ends the
/// block.
pub fn dir_entry(block: &[u8], name: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    while at + 8 <= block.len() {
        let ino = u32_at(block, at);
        let rec_len = usize::from(u16_at(block, at + 4));
        let name_len = usize::from(block[at + 6]);
        if rec_len < 8 || at + rec_len > block.len() || 8 + name_len > rec_len {
            return None;
        }
        if ino != 0 && &block[at + 8..at + 8 + name_len] == name {
            return Some(ino.into());
        }
        at += rec_len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock() -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        sb[0x4..0x8].copy_from_slice(&65536u32.to_le_bytes()); // blocks
        sb[0x18..0x1C].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB
        sb[0x20..0x24].copy_from_slice(&32768u32.to_le_bytes());
        sb[0x28..0x2C].copy_from_slice(&8192u32.to_le_bytes());
        sb[0x4C..0x50].copy_from_slice(&1u32.to_le_bytes());
        sb[0x58..0x5A].copy_from_slice(&256u16.to_le_bytes());
        sb[0x60..0x64].copy_from_slice(&(INCOMPAT_EXTENTS | INCOMPAT_64BIT).to_le_bytes());
        sb[0x64..0x68].copy_from_slice(&RO_COMPAT_METADATA_CSUM.to_le_bytes());
        sb[0xFE..0x100].copy_from_slice(&64u16.to_le_bytes());
        sb
    }

    const DISK: u64 = 256 << 20;

    #[test]
    fn a_superblock_gives_the_layout_and_inode_tables_their_used_part() {
        let g = Geometry::parse(&superblock(), DISK).unwrap();
        assert_eq!((g.block_size, g.groups, g.desc_size), (4096, 2, 64));
        assert_eq!(g.descriptors(), 4096..4096 + 128);
        let mut gdt = vec![0u8; 128];
        gdt[0x8..0xC].copy_from_slice(&100u32.to_le_bytes());
        gdt[0x1C..0x1E].copy_from_slice(&(8192u16 - 20).to_le_bytes()); // 20 used
        gdt[64 + 0x12..64 + 0x14].copy_from_slice(&BG_INODE_UNINIT.to_le_bytes());
        let tables = g.inode_tables(&gdt).unwrap();
        assert_eq!(
            tables,
            vec![InodeTable {
                bytes: 100 * 4096..100 * 4096 + 8192,
                first_inode: 1
            }]
        );
    }

    #[test]
    fn hostile_superblocks_and_descriptors_are_refused() {
        let mut sb = superblock();
        sb[0x38] = 0;
        assert!(matches!(
            Geometry::parse(&sb, DISK),
            Err(Ext4Error::Magic(_))
        ));
        let mut sb = superblock();
        sb[0x4..0x8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            Geometry::parse(&sb, DISK).is_err(),
            "more blocks than the disk"
        );
        let mut sb = superblock();
        sb[0x58..0x5A].copy_from_slice(&100u16.to_le_bytes());
        assert!(Geometry::parse(&sb, DISK).is_err(), "odd inode size");
        let mut sb = superblock();
        sb[0x20..0x24].copy_from_slice(&0u32.to_le_bytes());
        assert!(Geometry::parse(&sb, DISK).is_err(), "no blocks per group");
        let mut sb = superblock();
        sb[0x60] |= 0x10; // INCOMPAT_META_BG
        assert_eq!(Geometry::parse(&sb, DISK), Err(Ext4Error::MetaBg));
        assert!(
            Geometry::parse(&superblock()[..512], DISK).is_err(),
            "short"
        );

        let g = Geometry::parse(&superblock(), DISK).unwrap();
        let mut gdt = vec![0u8; 128];
        gdt[0x8..0xC].copy_from_slice(&65535u32.to_le_bytes()); // table past the end
        assert!(g.inode_tables(&gdt).is_err());
    }

    fn dir_inode(root: &[u8]) -> Vec<u8> {
        let mut i = vec![0u8; 256];
        i[0..2].copy_from_slice(&(S_IFDIR | 0o755).to_le_bytes());
        i[0x1A..0x1C].copy_from_slice(&2u16.to_le_bytes());
        i[0x20..0x24].copy_from_slice(&EXTENTS_FL.to_le_bytes());
        i[0x28..0x28 + root.len()].copy_from_slice(root);
        i
    }

    fn node(depth: u16, entries: &[[u8; 12]]) -> Vec<u8> {
        let mut b = vec![0u8; 60];
        b[0..2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
        b[2..4].copy_from_slice(&u16::try_from(entries.len()).unwrap().to_le_bytes());
        b[4..6].copy_from_slice(&4u16.to_le_bytes());
        b[6..8].copy_from_slice(&depth.to_le_bytes());
        for (i, e) in entries.iter().enumerate() {
            b[12 + i * 12..24 + i * 12].copy_from_slice(e);
        }
        b
    }

    fn leaf(start: u32, len: u16) -> [u8; 12] {
        leaf_at(0, start, len)
    }

    fn leaf_at(logical: u32, start: u32, len: u16) -> [u8; 12] {
        let mut e = [0u8; 12];
        e[0..4].copy_from_slice(&logical.to_le_bytes());
        e[4..6].copy_from_slice(&len.to_le_bytes());
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e
    }

    fn index(child: u32) -> [u8; 12] {
        let mut e = [0u8; 12];
        e[4..8].copy_from_slice(&child.to_le_bytes());
        e
    }

    #[test]
    fn directories_name_their_blocks_and_tree_nodes() {
        let g = Geometry::parse(&superblock(), DISK).unwrap();
        let n = g
            .directory(&dir_inode(&node(0, &[leaf(500, 2), leaf(900, 40000)])))
            .unwrap();
        assert_eq!(
            n.leaves,
            vec![Extent {
                file: 0,
                disk: 500 * 4096..502 * 4096
            }],
            "uninitialized extents fetch nothing"
        );
        let n = g.directory(&dir_inode(&node(1, &[index(700)]))).unwrap();
        assert_eq!(n.children, vec![(700 * 4096..701 * 4096, 0)]);

        // A file, a deleted directory, an inline one: nothing.
        let mut file = dir_inode(&node(0, &[leaf(500, 2)]));
        file[0..2].copy_from_slice(&0o100_644u16.to_le_bytes());
        assert_eq!(g.directory(&file).unwrap(), Node::default());
        // As a regular file it names its data.
        assert_eq!(
            g.regular_file(&file).unwrap().leaves,
            vec![Extent {
                file: 0,
                disk: 500 * 4096..502 * 4096
            }]
        );
        assert_eq!(
            g.regular_file(&dir_inode(&node(0, &[leaf(500, 2)])))
                .unwrap(),
            Node::default()
        );
        let mut gone = dir_inode(&node(0, &[leaf(500, 2)]));
        gone[0x1A] = 0;
        assert_eq!(g.directory(&gone).unwrap(), Node::default());
    }

    #[test]
    fn a_file_extent_says_where_in_the_file_it_starts() {
        let g = Geometry::parse(&superblock(), DISK).unwrap();
        let mut file = dir_inode(&node(0, &[leaf(500, 1), leaf_at(3, 800, 2)]));
        file[0..2].copy_from_slice(&0o100_755u16.to_le_bytes());
        let leaves = g.regular_file(&file).unwrap().leaves;
        assert_eq!(leaves[1].file, 3 * 4096, "after a hole of two blocks");
        assert_eq!(leaves[1].disk, 800 * 4096..802 * 4096);
    }

    #[test]
    fn inodes_are_found_in_their_groups_used_table() {
        let g = Geometry::parse(&superblock(), DISK).unwrap();
        let tables = [
            InodeTable {
                bytes: 100 * 4096..100 * 4096 + 8192,
                first_inode: 1,
            },
            InodeTable {
                bytes: 40000 * 4096..40000 * 4096 + 4096,
                first_inode: 8193,
            },
        ];
        assert_eq!(
            g.inode_at(&tables, 2),
            Some(100 * 4096 + 256..100 * 4096 + 512)
        );
        assert_eq!(
            g.inode_at(&tables, 8194),
            Some(40000 * 4096 + 256..40000 * 4096 + 512)
        );
        assert_eq!(g.inode_at(&tables, 33), None, "past the used part");
        assert_eq!(g.inode_at(&tables, 0), None);
        assert_eq!(g.inode_at(&tables, 16385), None, "no such group");
    }

    #[test]
    fn links_say_their_target_or_where_it_lies() {
        let g = Geometry::parse(&superblock(), DISK).unwrap();
        let mut short = vec![0u8; 256];
        short[0..2].copy_from_slice(&0o120_777u16.to_le_bytes());
        short[0x1A] = 1;
        short[0x4] = 7;
        short[0x28..0x2F].copy_from_slice(b"usr/lib");
        assert_eq!(g.link(&short), Some(LinkTarget::Here(b"usr/lib".to_vec())));
        let mut long = dir_inode(&node(0, &[leaf(900, 1)]));
        long[0..2].copy_from_slice(&0o120_777u16.to_le_bytes());
        long[0x4..0x6].copy_from_slice(&100u16.to_le_bytes());
        assert_eq!(
            g.link(&long),
            Some(LinkTarget::At(900 * 4096..900 * 4096 + 100))
        );
        long[0x4..0x8].copy_from_slice(&(1u32 << 20).to_le_bytes());
        assert_eq!(g.link(&long), None, "longer than PATH_MAX");
        assert_eq!(g.link(&dir_inode(&node(0, &[]))), None, "not a link");
    }

    #[test]
    fn a_directory_block_names_its_entries() {
        let mut block = vec![0u8; 1024];
        let mut at = 0;
        for (ino, name, rec) in [
            (2u32, &b"."[..], 12u16),
            (0, b"gone", 20),
            (11, b"bin", 992),
        ] {
            block[at..at + 4].copy_from_slice(&ino.to_le_bytes());
            block[at + 4..at + 6].copy_from_slice(&rec.to_le_bytes());
            block[at + 6] = u8::try_from(name.len()).unwrap();
            block[at + 8..at + 8 + name.len()].copy_from_slice(name);
            at += usize::from(rec);
        }
        assert_eq!(dir_entry(&block, b"bin"), Some(11));
        assert_eq!(dir_entry(&block, b"gone"), None, "a deleted entry");
        assert_eq!(dir_entry(&block, b"bi"), None);
        // A record length that runs past the block ends it.
        block[12 + 4..12 + 6].copy_from_slice(&5000u16.to_le_bytes());
        assert_eq!(dir_entry(&block, b"bin"), None);
        block[12 + 4..12 + 6].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(dir_entry(&block, b"bin"), None, "a zero length never loops");
    }

    #[test]
    fn hostile_extent_nodes_are_refused() {
        let g = Geometry::parse(&superblock(), DISK).unwrap();
        assert!(
            g.directory(&dir_inode(&node(0, &[leaf(65535, 10)])))
                .is_err(),
            "past the end"
        );
        assert!(
            g.directory(&dir_inode(&node(6, &[index(7)]))).is_err(),
            "too deep"
        );
        assert!(
            g.node(&node(1, &[index(7)]), Some(0)).is_err(),
            "depth must fall"
        );
        let mut many = node(0, &[]);
        many[2..4].copy_from_slice(&9u16.to_le_bytes());
        assert!(
            g.directory(&dir_inode(&many)).is_err(),
            "more entries than fit"
        );
        let mut bad = node(0, &[]);
        bad[0] = 0;
        assert!(g.directory(&dir_inode(&bad)).is_err());
        assert!(
            g.directory(&dir_inode(&node(0, &[leaf(0, 1)]))).is_err(),
            "block 0"
        );
    }
}
