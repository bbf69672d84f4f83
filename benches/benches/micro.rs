//! Micro-benchmarks of the per-I/O work that is not I/O: RAID address mapping, the buffer
//! pool, and the NBD header codec. `cargo bench -p benches --bench micro [-- FILTER]`.
//!
//! divan rather than criterion: a fraction of the compile time and dependencies.

use divan::{black_box, Bencher};

fn main() {
    divan::main();
}

/// `raidcore::level`: build a level, and map requests through it (every front I/O does).
mod raid_map {
    use super::*;
    use raidcore::level::{build, Level, Pieces};
    use raidcore::LevelKind;

    const MEMBERS: usize = 4;
    const MEMBER_DATA: u64 = 1 << 40;
    const CHUNK: u64 = 64 << 10;

    fn kind(name: &str) -> LevelKind {
        LevelKind::parse(name).expect("a level name")
    }

    fn level(name: &str) -> Box<dyn Level> {
        build(kind(name), &[MEMBER_DATA; MEMBERS], CHUNK).expect("a valid level")
    }

    /// Block-aligned offsets spread over the array (an LCG: cheap and repeatable), so the
    /// mapping sees chunk-crossing and non-crossing requests as a random workload would.
    fn offsets(size: u64, len: u64) -> impl FnMut() -> u64 {
        let blocks = (size - len) / 4096;
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        move || {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 11) % blocks * 4096
        }
    }

    #[divan::bench(args = ["raid0", "raid10"])]
    fn build_level(name: &str) -> Box<dyn Level> {
        level(black_box(name))
    }

    /// Into a reused list: the cost of the arithmetic alone.
    #[divan::bench(args = ["raid0", "raid10"], consts = [4096, 1048576])]
    fn map<const LEN: u64>(bencher: Bencher, name: &str) {
        let lvl = level(name);
        let mut next = offsets(lvl.size(), LEN);
        let mut out = Pieces::new();
        bencher.bench_local(|| {
            out.clear();
            lvl.map(black_box(next()), black_box(LEN), &mut out);
            black_box(out.len())
        });
    }

    /// Into a fresh list per request, as `Array::map` does: inline up to four pieces, so
    /// a 4 KiB request allocates nothing and a 1 MiB one over 64 KiB chunks spills to
    /// the heap once; the difference from `map` is that.
    #[divan::bench(args = ["raid0", "raid10"], consts = [4096, 1048576])]
    fn map_fresh<const LEN: u64>(bencher: Bencher, name: &str) {
        let lvl = level(name);
        let mut next = offsets(lvl.size(), LEN);
        bencher.bench_local(|| {
            let mut out = Pieces::new();
            lvl.map(black_box(next()), black_box(LEN), &mut out);
            out
        });
    }
}

/// `raidcore::BufPool`: every request takes a buffer and gives it back.
mod buf_pool {
    use super::*;
    use futures::executor::block_on;
    use raidcore::{BufPool, PoolConfig};

    fn pool() -> BufPool {
        BufPool::new(&PoolConfig::default()).expect("map the pool")
    }

    /// The async path the NBD server takes (no waiting: the class has free buffers).
    #[divan::bench(consts = [4096, 1048576])]
    fn get_drop<const LEN: usize>(bencher: Bencher) {
        let pool = pool();
        bencher.bench_local(|| drop(block_on(pool.get(black_box(LEN)))));
    }

    /// The non-waiting path, alone and with two threads contending for one class.
    #[divan::bench(consts = [4096, 1048576], threads = [1, 2])]
    fn try_get_drop<const LEN: usize>(bencher: Bencher) {
        let pool = pool();
        bencher.bench(|| drop(pool.try_get(black_box(LEN))));
    }

    /// `try_get` on an exhausted class: the price of finding out.
    #[divan::bench]
    fn try_get_exhausted(bencher: Bencher) {
        let pool = BufPool::new(&PoolConfig {
            classes: vec![(4096, 1)],
        })
        .expect("map the pool");
        let _held = pool.try_get(4096).expect("one free buffer");
        bencher.bench_local(|| pool.try_get(black_box(4096)).is_none());
    }
}

/// `backends::nbd::wire`: a request header in, a reply header out, per request.
mod nbd_codec {
    use super::*;
    use backends::nbd::wire::{
        ChunkHeader, Request, SimpleReply, CMD_READ, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
    };

    const REQUEST: Request = Request {
        flags: 0,
        typ: CMD_READ,
        handle: 0x0123_4567_89ab_cdef,
        offset: 1 << 30,
        len: 4096,
    };

    #[divan::bench]
    fn request_decode(bencher: Bencher) {
        let bytes = REQUEST.encode();
        bencher.bench_local(|| Request::decode(black_box(&bytes)).expect("a valid header"));
    }

    #[divan::bench]
    fn request_encode() -> [u8; 28] {
        black_box(REQUEST).encode()
    }

    #[divan::bench]
    fn simple_reply_encode() -> [u8; 16] {
        black_box(SimpleReply {
            error: 0,
            handle: REQUEST.handle,
        })
        .encode()
    }

    /// The structured reply header that precedes a READ's data (NBD_REPLY_TYPE_OFFSET_DATA).
    #[divan::bench]
    fn chunk_header_encode() -> [u8; 20] {
        black_box(ChunkHeader {
            flags: REPLY_FLAG_DONE,
            typ: REPLY_TYPE_OFFSET_DATA,
            handle: REQUEST.handle,
            len: 8 + 4096,
        })
        .encode()
    }
}
