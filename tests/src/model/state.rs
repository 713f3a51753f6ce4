//! The model: what the daemon must hold after every step, kept by the test
//! itself. Volumes are plain byte vectors, snapshots the bytes their volume
//! had when `vol snapshot create` returned, EBS direct snapshots the blocks
//! written to them. Nothing here asks the daemon anything.

use std::collections::BTreeMap;

/// The EBS direct APIs' block size, and the size of the snapshots the
/// model starts through them (1 GiB, EBS's smallest).
pub const EBS_BLOCK: u64 = 512 << 10;
pub const EBS_GIB: u64 = 1;

/// One volume as the model knows it.
#[derive(Clone, Debug)]
pub struct Volume {
    pub size: u64,
    pub chunk_size: u64,
    pub ephemeral: bool,
    pub attached: bool,
    /// The snapshot it was created from.
    pub source: Option<String>,
    /// Created from a snapshot with background hydration on.
    pub hydrates: bool,
    pub bytes: Vec<u8>,
}

/// Where a snapshot is in its life, as far as the model can tell. The
/// daemon finishes jobs on its own clock, so `Pending` may turn out
/// `Completed` at any step; everything else is decided by the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// EBS direct: started, blocks may still be put.
    Open,
    /// Being committed: a `vol snapshot create` job, or an EBS direct
    /// snapshot whose CompleteSnapshot answered `pending`.
    Pending,
    Completed,
    /// Allowed only after `interrupted`.
    Error,
}

/// What a snapshot must contain once completed.
#[derive(Clone, Debug)]
pub enum Content {
    /// A volume's bytes at the instant of `vol snapshot create`.
    Volume {
        volume: String,
        chunk_size: u64,
        bytes: Vec<u8>,
    },
    /// EBS direct: block index -> the byte every byte of the block holds
    /// (never 0: a block of zeros is not listed).
    Blocks(BTreeMap<u64, u8>),
}

impl Content {
    /// The volume a snapshot was taken of, if any.
    pub fn volume(&self) -> Option<&str> {
        match self {
            Content::Volume { volume, .. } => Some(volume),
            Content::Blocks(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub content: Content,
    pub phase: Phase,
    /// A restart or kill -9 came while it was open or pending: it may end
    /// `error` (its changes then belong to the next snapshot).
    pub interrupted: bool,
    /// Its content was read back and found equal since it completed (or
    /// since the last gc).
    pub verified: bool,
}

impl Snapshot {
    pub fn size(&self) -> u64 {
        match &self.content {
            Content::Volume { bytes, .. } => bytes.len() as u64,
            Content::Blocks(_) => EBS_GIB << 30,
        }
    }

    pub fn chunk_size(&self) -> u64 {
        match &self.content {
            Content::Volume { chunk_size, .. } => *chunk_size,
            Content::Blocks(_) => EBS_BLOCK,
        }
    }

    pub fn is_ebs(&self) -> bool {
        matches!(self.content, Content::Blocks(_))
    }

    /// Unsettled: it may still change phase without the model's doing.
    pub fn in_flight(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Pending)
    }
}

/// Everything the daemon must hold.
#[derive(Default, Debug)]
pub struct Model {
    pub volumes: BTreeMap<String, Volume>,
    /// Every snapshot not deleted, by id: `vol snapshot create`'s and EBS
    /// direct ones alike.
    pub snapshots: BTreeMap<String, Snapshot>,
}

impl Model {
    /// A new volume: zeros, or a snapshot's bytes followed by zeros.
    pub fn create(
        &mut self,
        name: &str,
        size: u64,
        chunk_size: u64,
        ephemeral: bool,
        source: Option<(&str, bool)>,
    ) {
        let mut bytes = vec![0u8; size as usize];
        if let Some((id, _)) = source {
            let Content::Volume { bytes: snap, .. } = &self.snapshots[id].content else {
                panic!("the model restores only volume snapshots, not {id}");
            };
            bytes[..snap.len()].copy_from_slice(snap);
        }
        self.volumes.insert(
            name.to_owned(),
            Volume {
                size,
                chunk_size,
                ephemeral,
                attached: false,
                source: source.map(|(id, _)| id.to_owned()),
                hydrates: source.is_some_and(|(_, h)| h),
                bytes,
            },
        );
    }

    pub fn volume(&self, name: &str) -> &Volume {
        &self.volumes[name]
    }

    pub fn volume_mut(&mut self, name: &str) -> &mut Volume {
        self.volumes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no volume {name} in the model"))
    }

    /// A completed WRITE of `pattern` (0: WRITE_ZEROES) over a range.
    pub fn write(&mut self, name: &str, offset: u64, len: u64, pattern: u8) {
        let v = self.volume_mut(name);
        v.bytes[offset as usize..(offset + len) as usize].fill(pattern);
    }

    /// Detach: an ephemeral volume is gone.
    pub fn detach(&mut self, name: &str) {
        if self.volume(name).ephemeral {
            self.volumes.remove(name);
        } else {
            self.volume_mut(name).attached = false;
        }
    }

    /// `vol snapshot create` returned `id`: the volume's bytes now.
    pub fn snapshot(&mut self, name: &str, id: &str) {
        let v = self.volume(name);
        let content = Content::Volume {
            volume: name.to_owned(),
            chunk_size: v.chunk_size,
            bytes: v.bytes.clone(),
        };
        self.add_snapshot(id, content, Phase::Pending);
    }

    pub fn add_snapshot(&mut self, id: &str, content: Content, phase: Phase) {
        let old = self.snapshots.insert(
            id.to_owned(),
            Snapshot {
                content,
                phase,
                interrupted: false,
                verified: false,
            },
        );
        assert!(old.is_none(), "snapshot id {id} handed out twice");
    }

    /// PutSnapshotBlock of a block filled with `pattern` (never 0).
    pub fn put_block(&mut self, id: &str, index: u64, pattern: u8) {
        match &mut self.snapshot_mut(id).content {
            Content::Blocks(blocks) => {
                blocks.insert(index, pattern);
            }
            Content::Volume { .. } => panic!("{id} is not an EBS direct snapshot"),
        }
    }

    pub fn snapshot_mut(&mut self, id: &str) -> &mut Snapshot {
        self.snapshots
            .get_mut(id)
            .unwrap_or_else(|| panic!("no snapshot {id} in the model"))
    }

    /// A restart or kill -9: whatever was in flight may end `error`.
    pub fn interrupt(&mut self) {
        for s in self.snapshots.values_mut().filter(|s| s.in_flight()) {
            s.interrupted = true;
        }
    }

    /// Snapshots of `phase`, by id.
    pub fn in_phase(&self, phase: Phase) -> Vec<String> {
        self.snapshots
            .iter()
            .filter(|(_, s)| s.phase == phase)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A snapshot of volume `name` may still be running: `vol snapshot
    /// create` may then be refused (one job per volume name at a time).
    pub fn snapshot_running(&self, name: &str) -> bool {
        self.snapshots.values().any(|s| {
            s.phase == Phase::Pending
                && matches!(&s.content, Content::Volume { volume, .. } if volume == name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_keep_the_bytes_of_their_instant() {
        let mut m = Model::default();
        m.create("a", 8192, 4096, false, None);
        m.write("a", 100, 10, 7);
        m.snapshot("a", "snap-1");
        m.write("a", 100, 10, 9);
        let Content::Volume { bytes, .. } = &m.snapshots["snap-1"].content else {
            panic!()
        };
        assert_eq!(bytes[100], 7);
        m.snapshot_mut("snap-1").phase = Phase::Completed;
        m.create("b", 12288, 4096, true, Some(("snap-1", true)));
        assert_eq!(m.volume("b").bytes[105], 7);
        assert_eq!(m.volume("b").bytes[9000], 0);
        m.volume_mut("b").attached = true;
        m.detach("b");
        assert!(!m.volumes.contains_key("b"), "ephemeral: gone at detach");
        m.interrupt();
        assert!(!m.snapshots["snap-1"].interrupted, "it had completed");
    }
}
