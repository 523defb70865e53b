//! How many FUSE operations the mounts served and how long each took, by
//! operation: one [`FuseOps`] shared by every mount of a daemon, timed with
//! one clock read at each end and two atomic adds.

use std::ops::Deref;
use std::time::Instant;

use crate::latency::{Latency, LatencySnapshot};

/// The operations a layer's filesystem answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Release,
    Read,
    Opendir,
    Readdir,
    Getxattr,
    Listxattr,
    Access,
    Statfs,
}

impl Op {
    /// Every operation, in the order of their discriminants.
    pub const ALL: [Op; 12] = [
        Op::Lookup,
        Op::Getattr,
        Op::Readlink,
        Op::Open,
        Op::Release,
        Op::Read,
        Op::Opendir,
        Op::Readdir,
        Op::Getxattr,
        Op::Listxattr,
        Op::Access,
        Op::Statfs,
    ];

    /// The name metrics show (the FUSE operation's, lower case).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Readlink => "readlink",
            Op::Open => "open",
            Op::Release => "release",
            Op::Read => "read",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Access => "access",
            Op::Statfs => "statfs",
        }
    }
}

/// Latencies (and so counts) of the operations of every mount sharing it.
#[derive(Debug, Default)]
pub struct FuseOps {
    latency: [Latency; Op::ALL.len()],
}

impl FuseOps {
    /// Each operation with its latencies since start.
    pub fn snapshot(&self) -> [(Op, LatencySnapshot); Op::ALL.len()] {
        std::array::from_fn(|i| (Op::ALL[i], self.latency[i].snapshot()))
    }
}

/// An operation being served: recorded when dropped, which is when its
/// reply has been sent (a read's miss moves it into the task that
/// answers).
pub(super) struct Timed<O: Deref<Target = FuseOps>> {
    ops: O,
    op: Op,
    at: Instant,
}

impl<O: Deref<Target = FuseOps>> Timed<O> {
    pub(super) fn start(ops: O, op: Op) -> Self {
        Timed {
            ops,
            op,
            at: Instant::now(),
        }
    }

    /// The same timer over `ops` (an owned handle, for a task that
    /// outlives the borrow); recorded once, when the new one is dropped.
    pub(super) fn hand_over<P: Deref<Target = FuseOps>>(self, ops: P) -> Timed<P> {
        let moved = Timed {
            ops,
            op: self.op,
            at: self.at,
        };
        std::mem::forget(self);
        moved
    }
}

impl<O: Deref<Target = FuseOps>> Drop for Timed<O> {
    fn drop(&mut self) {
        self.ops.latency[self.op as usize].record(self.at.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_its_slot_and_a_dropped_timer_counts_once() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?}");
        }
        let ops = std::sync::Arc::new(FuseOps::default());
        drop(Timed::start(&*ops, Op::Read));
        drop(Timed::start(&*ops, Op::Read).hand_over(ops.clone()));
        drop(Timed::start(&*ops, Op::Lookup));
        let s = ops.snapshot();
        assert_eq!(s[Op::Read as usize].1.count(), 2);
        assert_eq!(s[Op::Lookup as usize].1.count(), 1);
        assert_eq!(s[Op::Statfs as usize].1.count(), 0);
    }
}
