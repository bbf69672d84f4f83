//! The block-layer limits the kernel gets for /dev/ublkbN, derived from the array.

use libublk::sys;

/// The kernel's page size bounds the logical block size of a ublk device.
const PAGE_SHIFT: u8 = 12;

/// What the device parameters are computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Array size in bytes.
    pub size: u64,
    /// The array's natural block size (the largest member block size).
    pub block_size: u32,
    /// Largest I/O the kernel may send, in bytes (the device's io buffer size).
    pub max_io: u32,
    /// Largest discard / write-zeroes request, in bytes (the array's limit).
    pub max_zero: u64,
}

impl Geometry {
    /// log2 of the logical block size: the array's block, capped at a page (ublk's limit;
    /// the array read-modify-writes inside larger blocks).
    pub fn logical_shift(&self) -> u8 {
        let bs = self.block_size.clamp(512, 1 << PAGE_SHIFT);
        bs.trailing_zeros() as u8
    }

    /// The device size in bytes, whole logical blocks only.
    pub fn dev_bytes(&self) -> u64 {
        let lbs = 1u64 << self.logical_shift();
        self.size - self.size % lbs
    }
}

/// Basic limits plus discard/write-zeroes, and the volatile-cache and FUA attributes: the
/// array acknowledges writes before they are durable unless asked (FLUSH, FUA), so the
/// kernel must send both.
pub fn device_params(g: &Geometry) -> sys::ublk_params {
    let lshift = g.logical_shift();
    let sectors = |bytes: u64| (bytes >> 9).min(u64::from(u32::MAX)) as u32;
    // Discard and zeroing carry no data, but each is one array request: cap them at the
    // array's largest request, in whole logical blocks.
    let max_zero = g.max_zero - g.max_zero % (1u64 << lshift);
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: lshift,
            physical_bs_shift: lshift.max(PAGE_SHIFT),
            io_opt_shift: PAGE_SHIFT,
            io_min_shift: lshift.max(PAGE_SHIFT),
            max_sectors: g.max_io >> 9,
            dev_sectors: g.dev_bytes() >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            // The array trims whole blocks only; 4 KiB keeps file systems' discards
            // page-sized.
            discard_granularity: 1 << lshift.max(PAGE_SHIFT),
            max_discard_sectors: sectors(max_zero),
            max_write_zeroes_sectors: sectors(max_zero),
            // The driver supports single-range discards only.
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(size: u64, block_size: u32) -> Geometry {
        Geometry {
            size,
            block_size,
            max_io: 512 << 10,
            max_zero: 32 << 20,
        }
    }

    #[test]
    fn block_sizes_follow_the_array_up_to_a_page() {
        let p = device_params(&geo(1 << 30, 512));
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        let p = device_params(&geo(1 << 30, 4096));
        assert_eq!(p.basic.logical_bs_shift, 12);
        // 64 KiB member blocks: the kernel cannot go above a page; the array RMWs.
        let p = device_params(&geo(1 << 30, 65536));
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert!(p.basic.physical_bs_shift >= p.basic.logical_bs_shift);
    }

    #[test]
    fn cache_and_fua_and_discard_are_advertised() {
        let p = device_params(&geo(1 << 30, 512));
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.discard.max_discard_sectors, (32 << 20) >> 9);
        assert_eq!(p.discard.max_write_zeroes_sectors, (32 << 20) >> 9);
        assert!(p.discard.discard_granularity >= 512);
    }

    #[test]
    fn size_is_whole_logical_blocks() {
        let g = geo((1 << 20) + 1000, 4096);
        assert_eq!(g.dev_bytes(), 1 << 20);
        assert_eq!(device_params(&g).basic.dev_sectors, (1 << 20) >> 9);
    }
}
