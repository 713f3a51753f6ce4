//! Unit tests of the chunk map: the bitmaps against a model, the dirty set's
//! file round trip and its refusal of damage.

use super::*;

fn geo(size: u64) -> ChunkGeometry {
    ChunkGeometry::new(size, CS).unwrap()
}
use proptest::prelude::*;

const CS: u64 = 64 << 10;

#[test]
fn huge_sparse_map_is_cheap() {
    let m = ChunkMap::new(geo(64 << 40));
    assert_eq!(m.local_chunks(), 0);
    m.mark_written((64 << 40) - 1, 1);
    assert_eq!(m.state(((64 << 40) - 1) / CS), ChunkState::Local);
    let allocated = m
        .local
        .pages
        .read()
        .unwrap()
        .iter()
        .filter(|p| p.get().is_some())
        .count();
    assert_eq!(allocated, 1);
}

#[test]
fn runs_merge_and_cover_exactly() {
    let m = ChunkMap::new(geo(10 * CS));
    m.mark_written(2 * CS + 5, 10);
    m.mark_written(3 * CS, CS);
    let r = m.runs(CS / 2, 5 * CS);
    assert_eq!(
        r,
        vec![
            (CS / 2, CS + CS / 2, ChunkState::Zero),
            (2 * CS, 2 * CS, ChunkState::Local),
            (4 * CS, CS + CS / 2, ChunkState::Zero),
        ]
    );
}

#[test]
fn zero_marks_dirty_only_when_it_held_data() {
    let m = ChunkMap::new(geo(4 * CS));
    m.mark_zero(1);
    assert!(m.dirty_chunks().is_empty());
    m.mark_written(0, 1);
    m.dirty.clear(0);
    m.mark_zero(0);
    assert_eq!(m.dirty_chunks(), [0]);
    assert_eq!(m.state(0), ChunkState::Zero);
}

#[test]
fn ranges_set_whole_words_and_batches_are_bounded() {
    let m = ChunkMap::new(geo(200_000 << 16));
    m.load_allocation(&[(70 << 16, 71 << 16)]);
    m.set_base_range(3..70_000);
    m.set_base_range(199_999..200_000);
    assert_eq!(m.base_chunks(), 70_000 - 3 + 1);
    assert_eq!(m.state(2), ChunkState::Zero);
    assert_eq!(m.state(3), ChunkState::Base);
    assert_eq!(m.state(69_999), ChunkState::Base);
    assert_eq!(m.state(70_000), ChunkState::Zero);
    assert_eq!(m.base_and_local(), [70]);
    assert_eq!(m.base_batch(3), [3, 4, 5]);
    assert_eq!(m.base_batch(usize::MAX).len() as u64, m.base_chunks());
}

#[test]
fn base_chunks_leave_the_base_once() {
    let m = ChunkMap::new(geo(8 * CS));
    m.load_allocation(&[(2 * CS, 3 * CS)]);
    assert!(!m.set_base(1), "no stray bytes");
    assert!(m.set_base(2), "stray bytes from an unsynced fetch");
    m.set_base(3);
    assert_eq!(m.state(2), ChunkState::Base);
    assert_eq!(m.base_list(), [1, 2, 3]);
    assert_eq!(
        m.runs(0, 4 * CS),
        vec![(0, CS, ChunkState::Zero), (CS, 3 * CS, ChunkState::Base)]
    );
    // Hydrated: same content, so not dirty.
    m.mark_hydrated(1);
    assert_eq!(m.state(1), ChunkState::Local);
    assert!(m.dirty_chunks().is_empty());
    // Replaced whole by a write, or trimmed: dirty either way.
    m.unbase(2, true);
    m.unbase(3, false);
    assert_eq!(
        (m.state(2), m.state(3)),
        (ChunkState::Local, ChunkState::Zero)
    );
    assert_eq!(m.dirty_chunks(), [2, 3]);
    assert_eq!(m.base_chunks(), 0);
}

#[test]
fn dirty_set_round_trips_and_rejects_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty");
    let m = ChunkMap::new(geo(1 << 30));
    for c in [0, 7, 16383] {
        m.mark_written(c * CS, 1);
    }
    m.save_dirty(&path).unwrap();
    let n = ChunkMap::new(geo(1 << 30));
    n.load_dirty(&path).unwrap();
    assert_eq!(n.dirty_chunks(), [0, 7, 16383]);
    let mut data = std::fs::read(&path).unwrap();
    data.pop();
    std::fs::write(&path, &data).unwrap();
    assert!(ChunkMap::new(geo(1 << 30)).load_dirty(&path).is_err());
    std::fs::write(&path, b"VDIRTY01\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    assert!(ChunkMap::new(geo(1 << 30)).load_dirty(&path).is_err());
}

proptest! {
    /// The map agrees with a reference `Vec<bool>` under any sequence
    /// of writes and zeroings, and `runs` covers any range exactly.
    #[test]
    fn model_check(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..200_000), 1..50),
                   q in (0u64..(64 * CS), 1u64..(16 * CS))) {
        let m = ChunkMap::new(geo(64 * CS));
        let mut model = [false; 64];
        for (write, chunk, len) in ops {
            if write {
                let off = chunk * CS;
                let len = len.min(64 * CS - off);
                m.mark_written(off, len);
                for c in off / CS..=(off + len - 1) / CS { model[c as usize] = true; }
            } else {
                m.mark_zero(chunk);
                model[chunk as usize] = false;
            }
        }
        for (c, want) in model.iter().enumerate() {
            prop_assert_eq!(m.state(c as u64) == ChunkState::Local, *want);
        }
        let (off, len) = (q.0, q.1.min(64 * CS - q.0));
        let runs = m.runs(off, len);
        prop_assert_eq!(runs.first().unwrap().0, off);
        prop_assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), len);
        for w in runs.windows(2) {
            prop_assert_eq!(w[0].0 + w[0].1, w[1].0);
            prop_assert_ne!(w[0].2, w[1].2);
        }
    }
}
