//! Maglev lookup tables (Eisenbud et al., NSDI 2016, section 3.4) of the datapath's fixed size.
//!
//! The `maglev` crate keeps its table private, sizes it itself and hashes with `DefaultHasher`,
//! whose algorithm Rust does not promise to keep; every node (and every agent version) must build
//! the same table for the same backends, so the permutation here uses a fixed, stable hash.
use privatelink_common::MAGLEV_SIZE;

/// SplitMix64 finaliser: a fixed, well-mixed hash of a 64-bit value.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Builds the table: for each bucket, the index into `backends` (identified by a stable 64-bit
/// identity, e.g. the address) that owns it. Empty input gives an empty table.
pub fn table(backends: &[u64]) -> Vec<u32> {
    let m = MAGLEV_SIZE as u64;
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|&id| {
            let offset = mix64(id ^ 0x6a09_e667_f3bc_c908) % m;
            let skip = mix64(id ^ 0xbb67_ae85_84ca_a73b) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; MAGLEV_SIZE];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_SIZE {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bucket_is_owned_and_shares_are_even() {
        let t = table(&[1, 2, 3, 4, 5]);
        assert_eq!(t.len(), MAGLEV_SIZE);
        let mut counts = [0usize; 5];
        for &b in &t {
            counts[b as usize] += 1;
        }
        for c in counts {
            // Maglev guarantees shares within one bucket of M/N.
            assert!(
                c.abs_diff(MAGLEV_SIZE / 5) <= 1,
                "uneven shares: {counts:?}"
            );
        }
    }

    #[test]
    fn adding_a_backend_moves_about_one_in_n() {
        let ids: Vec<u64> = (1..=8).collect();
        let before = table(&ids);
        let mut more = ids.clone();
        more.push(9);
        let after = table(&more);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Ideal is M/9 ≈ 227 buckets; Maglev's bound is a little above that.
        assert!(
            moved < MAGLEV_SIZE * 2 / 9,
            "{moved} of {MAGLEV_SIZE} buckets moved"
        );
        assert!(
            moved >= MAGLEV_SIZE / 9 - 1,
            "{moved} moved: the new backend got too little"
        );
    }

    #[test]
    fn stable_for_the_same_input() {
        assert_eq!(table(&[7, 9, 11]), table(&[7, 9, 11]));
        assert!(table(&[]).is_empty());
    }
}
