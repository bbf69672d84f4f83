use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

const K: u64 = 1024;

fn pieces(l: &dyn Level, off: u64, len: u64) -> Pieces {
    let mut v = Pieces::new();
    l.map(off, len, &mut v);
    v
}

/// Every structural promise a level makes, checked for one request.
fn check_map(l: &dyn Level, sizes: &[u64], off: u64, len: u64) {
    let ps = pieces(l, off, len);
    let mut at = 0;
    for p in &ps {
        assert_eq!(p.req_off, at, "pieces are contiguous and in order");
        assert!(p.len > 0);
        assert!(!p.copies.is_empty());
        let mut seen = HashSet::new();
        for c in &p.copies {
            assert!(
                seen.insert(c.member),
                "copies of a piece sit on distinct members"
            );
            assert!(c.offset + p.len <= l.member_span(c.member));
            assert!(l.member_span(c.member) <= sizes[c.member]);
        }
        at += p.len;
    }
    assert_eq!(at, len, "pieces cover the request exactly");
}

/// No two array blocks land on the same member block (mapping is injective).
fn check_injective(l: &dyn Level, block: u64) {
    let mut used = HashSet::new();
    for b in 0..l.size() / block {
        for p in pieces(l, b * block, block) {
            for c in &p.copies {
                assert!(
                    used.insert((c.member, c.offset)),
                    "array block {b} reuses member {} offset {}",
                    c.member,
                    c.offset
                );
            }
        }
    }
}

#[test]
fn sizes_follow_md() {
    let sizes = [100 * K, 300 * K, 200 * K];
    assert_eq!(build(LevelKind::Linear, &sizes, 0).unwrap().size(), 600 * K);
    // raid0 zones: 3x100K + 2x100K + 1x100K, in 4K chunks = everything.
    assert_eq!(
        build(LevelKind::Raid0, &sizes, 4 * K).unwrap().size(),
        600 * K
    );
    assert_eq!(build(LevelKind::Raid1, &sizes, 0).unwrap().size(), 100 * K);
    // near-2 over 3 members: 25 rows of 4K chunks x 3 members = 75 positions, 37 whole
    // chunks of data (md rounds the same way).
    assert_eq!(
        build(LevelKind::Raid10, &sizes, 4 * K).unwrap().size(),
        37 * 4 * K
    );
    // raid0 rounds each member down to whole chunks: 100K/64K -> 64K each.
    assert_eq!(
        build(LevelKind::Raid0, &[100 * K, 100 * K], 64 * K)
            .unwrap()
            .size(),
        128 * K
    );
}

#[test]
fn raid0_stripes_in_layout_order() {
    let l = build(LevelKind::Raid0, &[64 * K, 64 * K], 4 * K).unwrap();
    let ps = pieces(&*l, 2 * K, 8 * K);
    let placed: Vec<(usize, u64, u64)> = ps
        .iter()
        .map(|p| (p.copies[0].member, p.copies[0].offset, p.len))
        .collect();
    assert_eq!(
        placed,
        vec![(0, 2 * K, 2 * K), (1, 0, 4 * K), (0, 4 * K, 2 * K)]
    );
}

#[test]
fn raid0_second_zone_uses_only_larger_members() {
    let l = build(LevelKind::Raid0, &[8 * K, 16 * K], 4 * K).unwrap();
    // Zone 0: 16K across both; zone 1: member 1's remaining 8K.
    let ps = pieces(&*l, 16 * K, 8 * K);
    assert_eq!(ps.len(), 2);
    assert!(ps.iter().all(|p| p.copies[0].member == 1));
    assert_eq!(ps[0].copies[0].offset, 8 * K);
    assert_eq!(ps[1].copies[0].offset, 12 * K);
}

#[test]
fn raid10_near2_places_copies_like_md() {
    let l = build(LevelKind::Raid10, &[64 * K; 4], 4 * K).unwrap();
    let c: Vec<_> = pieces(&*l, 4 * K, 4 * K)[0].copies.to_vec();
    assert_eq!(
        c,
        vec![
            Copy {
                member: 2,
                offset: 0
            },
            Copy {
                member: 3,
                offset: 0
            }
        ]
    );
    // Odd count: chunk 1 sits at grid positions 2,3 = member 2 row 0, member 0 row 1.
    let l3 = build(LevelKind::Raid10, &[64 * K; 3], 4 * K).unwrap();
    let c3: Vec<_> = pieces(&*l3, 4 * K, 4 * K)[0].copies.to_vec();
    assert_eq!(
        c3,
        vec![
            Copy {
                member: 2,
                offset: 0
            },
            Copy {
                member: 0,
                offset: 4 * K
            }
        ]
    );
}

#[test]
fn tolerance_matches_redundancy() {
    let s4 = [64 * K; 4];
    let r10 = build(LevelKind::Raid10, &s4, 4 * K).unwrap();
    assert!(r10.tolerates(&[true, false, true, false]), "one per pair");
    assert!(!r10.tolerates(&[true, true, false, false]), "a whole pair");
    let r1 = build(LevelKind::Raid1, &s4[..3], 0).unwrap();
    assert!(r1.tolerates(&[true, true, false]));
    assert!(!r1.tolerates(&[true, true, true]));
    let r0 = build(LevelKind::Raid0, &s4, 4 * K).unwrap();
    assert!(r0.tolerates(&[false; 4]));
    assert!(!r0.tolerates(&[false, true, false, false]));
    let r10_3 = build(LevelKind::Raid10, &s4[..3], 4 * K).unwrap();
    assert!(
        !r10_3.tolerates(&[true, false, true]),
        "members 2 and 0 share chunk 1"
    );
}

#[test]
fn bad_layouts_are_refused() {
    assert!(matches!(
        build(LevelKind::Raid1, &[K * 64], 0),
        Err(LevelError::TooFewMembers { min: 2, got: 1, .. })
    ));
    assert!(matches!(
        build(LevelKind::Raid0, &[K * 64; 2], 3000),
        Err(LevelError::BadChunk(3000))
    ));
    assert!(matches!(
        build(LevelKind::Raid10, &[K * 64, K * 2], 4 * K),
        Err(LevelError::MemberTooSmall { index: 1, .. })
    ));
}

#[test]
fn every_level_is_injective_on_small_arrays() {
    for kind in LevelKind::ALL {
        for sizes in [vec![32 * K, 32 * K], vec![16 * K, 40 * K, 24 * K]] {
            let l = build(kind, &sizes, 4 * K).unwrap();
            check_injective(&*l, 4 * K);
        }
    }
}

proptest! {
    #[test]
    fn map_covers_every_request(
        kind in prop::sample::select(LevelKind::ALL.to_vec()),
        sizes in prop::collection::vec(16u64..200, 2..6),
        chunk_pow in 12u32..17,
        a in 0u64..1_000_000,
        b in 0u64..1_000_000,
    ) {
        let sizes: Vec<u64> = sizes.iter().map(|s| s * 64 * K).collect();
        let l = build(kind, &sizes, 1 << chunk_pow).unwrap();
        let size = l.size();
        prop_assume!(size > 0);
        let off = a * 512 % size;
        let len = (b * 512 % (size - off)).max(512);
        check_map(&*l, &sizes, off, len);
    }
}
