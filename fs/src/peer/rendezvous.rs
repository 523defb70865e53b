//! Rendezvous (highest-random-weight) hashing: the owner of a key among a
//! set of nodes is the node with the highest weight for it, and every node
//! that knows the same set picks the same owner without asking anyone.
//!
//! A node that leaves takes only its own keys with it: each goes to the
//! node with the next weight, and no other key moves (a ring would need
//! virtual nodes for the same spread).

use sha2::{Digest as _, Sha256};

/// The weight of `node` for `key`: the first 8 bytes (big endian) of
/// sha256(node || key).
pub fn weight(node: &str, key: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update(key);
    let sum = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&sum[..8]);
    u64::from_be_bytes(first)
}

/// The indexes of `nodes` from the owner of `key` down: by weight, highest
/// first (ties, which need equal hashes, by name).
pub fn ranked<S: AsRef<str>>(nodes: &[S], key: &[u8]) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (weight(n.as_ref(), key), i))
        .collect();
    order.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| nodes[a.1].as_ref().cmp(nodes[b.1].as_ref()))
    });
    order.into_iter().map(|(_, i)| i).collect()
}

/// The index in `nodes` of the owner of `key`; `None` when there is no
/// node.
pub fn owner<S: AsRef<str>>(nodes: &[S], key: &[u8]) -> Option<usize> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (weight(n.as_ref(), key), i))
        .max_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| nodes[b.1].as_ref().cmp(nodes[a.1].as_ref()))
        })
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u32) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("key-{i}").into_bytes()).collect()
    }

    const NODES: [&str; 4] = [
        "127.0.0.2:7600",
        "127.0.0.3:7600",
        "127.0.0.4:7600",
        "127.0.0.5:7600",
    ];

    #[test]
    fn the_owner_is_the_same_whoever_asks_and_in_any_order() {
        let mut reversed = NODES;
        reversed.reverse();
        for k in keys(200) {
            let a = NODES[owner(&NODES, &k).unwrap()];
            let b = reversed[owner(&reversed, &k).unwrap()];
            assert_eq!(a, b);
            assert_eq!(a, NODES[ranked(&NODES, &k)[0]], "owner is ranked first");
        }
        assert_eq!(owner::<&str>(&[], b"k"), None);
        assert_eq!(weight("a", b"k"), weight("a", b"k"));
        assert_ne!(weight("a", b"k"), weight("b", b"k"));
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let fewer: Vec<&str> = NODES.iter().copied().filter(|n| *n != NODES[2]).collect();
        let mut moved = 0;
        for k in keys(1000) {
            let before = NODES[owner(&NODES, &k).unwrap()];
            let after = fewer[owner(&fewer, &k).unwrap()];
            if before == NODES[2] {
                moved += 1;
                // Its keys go to the node ranked next.
                assert_eq!(after, NODES[ranked(&NODES, &k)[1]]);
            } else {
                assert_eq!(before, after, "a key of a node that stayed moved");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn keys_spread_over_the_nodes() {
        let mut counts = [0u32; 4];
        for k in keys(1000) {
            counts[owner(&NODES, &k).unwrap()] += 1;
        }
        for (n, c) in NODES.iter().zip(counts) {
            assert!((150..=350).contains(&c), "{n} owns {c} of 1000: {counts:?}");
        }
    }
}
